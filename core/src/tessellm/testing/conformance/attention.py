"""``check_attention_backend``: a registered backend against the definition of paged
attention on random steps, for every capability it claims."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tessellm.interfaces.attention import AttentionBackend, AttentionCapabilities, AttentionSpec
from tessellm.testing.conformance.paged_inputs import MIXES, make_step, reference_attention
from tessellm.testing.conformance.result import Checker, CheckResult

# Allowed |out - reference| <= atol + rtol * |reference|, per dtype, against the float64
# definition computed from the same (rounded) inputs. fp32 allows TF32 matmuls; the
# half types allow rounding the probabilities and the output to the run dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-3, 2e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 2e-2),
}
DTYPE_ORDER = (torch.float32, torch.bfloat16, torch.float16)
# Sizes tried where a backend claims "any".
ANY_HEAD_SIZES = (32, 64, 80, 128)
ANY_BLOCK_SIZES = (1, 4, 16, 32, 128)
GQA_RATIOS = (1, 2, 4)
NUM_KV_HEADS = 2
WINDOW, SOFT_CAP = 7, 5.0


@dataclass(frozen=True)
class Case:
    spec: AttentionSpec
    mixes: tuple[str, ...]
    sliding_window: int | None = None
    logits_soft_cap: float | None = None

    def label(self) -> str:
        s = self.spec
        parts = [
            f"{s.device_type}",
            str(s.dtype).removeprefix("torch."),
            f"head {s.head_size}",
            f"block {s.block_size}",
            f"{s.num_heads}q/{s.num_kv_heads}kv heads",
        ]
        if self.sliding_window:
            parts.append(f"window {self.sliding_window}")
        if self.logits_soft_cap:
            parts.append(f"soft-cap {self.logits_soft_cap}")
        return ", ".join(parts)


def available_device_types() -> dict[str, torch.device]:
    """Spec device type -> torch device, for the devices this machine has."""
    found = {"cpu": torch.device("cpu")}
    if torch.cuda.is_available():
        found["hip" if torch.version.hip else "cuda"] = torch.device("cuda")
        found.setdefault("cuda", torch.device("cuda"))
    return found


def _pick(claimed: tuple[int, ...] | None, anything: tuple[int, ...], base: int) -> list[int]:
    """The base size first, then up to three more: the smallest, the largest and one
    near the base of what is claimed."""
    if claimed is None:
        return [base, *(x for x in anything if x != base)]
    ordered = sorted(claimed)
    first = min(ordered, key=lambda x: (abs(x - base), x))
    return list(dict.fromkeys([first, ordered[0], ordered[-1], ordered[len(ordered) // 2]]))


def plan_cases(caps: AttentionCapabilities, device_type: str) -> list[Case]:
    """One factor at a time around a base case, so every claimed value runs once."""
    dtypes = [d for d in DTYPE_ORDER if d in caps.dtypes]
    heads = _pick(caps.head_sizes, ANY_HEAD_SIZES, 64)
    blocks = _pick(caps.block_sizes, ANY_BLOCK_SIZES, 16)
    main = dtypes[0]
    base = AttentionSpec(device_type, main, heads[0], 2 * NUM_KV_HEADS, NUM_KV_HEADS, blocks[0])
    cases = [Case(replace(base, dtype=d), tuple(MIXES)) for d in dtypes]
    cases += [Case(replace(base, head_size=h), ("mixed",)) for h in heads[1:]]
    cases += [Case(replace(base, block_size=b), ("mixed", "decode")) for b in blocks[1:]]
    cases += [
        Case(replace(base, num_heads=r * NUM_KV_HEADS), ("mixed", "many"))
        for r in GQA_RATIOS
        if r != 2
    ]
    window = WINDOW if caps.sliding_window else None
    cap = SOFT_CAP if caps.logits_soft_cap else None
    featured = replace(base, sliding_window=window is not None, logits_soft_cap=cap is not None)
    if window:
        cases.append(Case(replace(featured, logits_soft_cap=False), tuple(MIXES), window))
    if cap:
        cases.append(Case(replace(featured, sliding_window=False), ("mixed", "decode"), None, cap))
    if window or cap:
        both = (20 if window else None, 2.0 if cap else None)
        cases += [Case(replace(featured, dtype=d), ("mixed", "many"), *both) for d in dtypes]
    return cases


def refusal_specs(caps: AttentionCapabilities, device_type: str) -> list[tuple[str, AttentionSpec]]:
    """Specs outside the claimed capabilities, each with what makes it so."""
    base = AttentionSpec(device_type, torch.float32, 64, 4, 2, 16)
    specs = [("5 heads over 2 KV heads", replace(base, num_heads=5))]
    if "*" not in caps.device_types:
        specs.append(("an unclaimed device type", replace(base, device_type="no-such-device")))
    unclaimed = [d for d in (torch.float64, *DTYPE_ORDER) if d not in caps.dtypes]
    if unclaimed:
        specs.append((f"unclaimed dtype {unclaimed[0]}", replace(base, dtype=unclaimed[0])))
    if caps.head_sizes is not None:
        size = next(h for h in (max(caps.head_sizes) + 8, 1, 3) if h not in caps.head_sizes)
        specs.append((f"unclaimed head size {size}", replace(base, head_size=size)))
    if caps.block_sizes is not None:
        size = next(b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b not in caps.block_sizes)
        specs.append((f"unclaimed block size {size}", replace(base, block_size=size)))
    if not caps.sliding_window:
        specs.append(("a sliding window (not claimed)", replace(base, sliding_window=True)))
    if not caps.logits_soft_cap:
        specs.append(("soft-capping (not claimed)", replace(base, logits_soft_cap=True)))
    return specs


def _compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> str | None:
    atol, rtol = TOLERANCES[dtype]
    got64 = got.detach().cpu().double()
    err = (got64 - want).abs()
    bad = err > atol + rtol * want.abs()
    if not bool(bad.any()) and bool(torch.isfinite(got64).all()):
        return None
    token, head, _ = (int(i) for i in torch.nonzero(bad | ~torch.isfinite(got64))[0])
    return (
        f"{int(bad.sum())} of {bad.numel()} outputs outside atol {atol}, rtol {rtol}; "
        f"max error {float(err.nan_to_num(float('inf')).max()):.3g}, first at token {token} "
        f"head {head}"
    )


def _run_case(checker: Checker, cls: type[AttentionBackend], case: Case, device: torch.device):
    spec = case.spec
    reasons = cls.validate(spec)
    if reasons:
        checker.fail(f"[{case.label()}] validate refuses a spec its capabilities claim: {reasons}")
        return
    backend = cls(spec)  # one instance for every mix: buffers must survive other sizes
    for seed, mix in enumerate(case.mixes):
        where = f"[{case.label()}, {mix} batch]"
        step = make_step(
            MIXES[mix],
            block_size=spec.block_size,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            dtype=spec.dtype,
            device=device,
            seed=seed,
        )
        k_cache, v_cache = step.k_cache.clone(), step.v_cache.clone()
        metadata = step.fresh_metadata()
        scale = spec.head_size**-0.5
        try:
            backend.prepare(metadata)
            backend.write_kv(step.key, step.value, k_cache, v_cache, metadata)
            out = backend.forward(
                step.query,
                k_cache,
                v_cache,
                metadata,
                scale=scale,
                sliding_window=case.sliding_window,
                logits_soft_cap=case.logits_soft_cap,
            )
        except Exception as exc:
            checker.crashed(f"{where} the backend", exc)
            continue
        want_k, want_v = step.expected_caches()
        if not (torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)):
            checker.fail(
                f"{where} write_kv: the caches differ from this step's K/V stored at "
                "slot_mapping (and nothing else changed)"
            )
            continue
        if out.shape != step.query.shape or out.dtype != spec.dtype:
            checker.fail(
                f"{where} forward returned {tuple(out.shape)} {out.dtype}, expected "
                f"{tuple(step.query.shape)} {spec.dtype}"
            )
            continue
        want = reference_attention(
            step,
            want_k,
            want_v,
            scale=scale,
            sliding_window=case.sliding_window,
            logits_soft_cap=case.logits_soft_cap,
        )
        mismatch = _compare(out, want, spec.dtype)
        if mismatch:
            checker.fail(f"{where} forward differs from paged attention's definition: {mismatch}")
    checker.result.checked.append(f"{case.label()}: {', '.join(case.mixes)}")


def check_attention_backend(name: str) -> CheckResult:
    """Check the attention backend registered as ``name``.

    On every device type it claims that this machine has, it runs random paged steps
    (scattered block tables, caches full of large values outside each context; mixes of
    decodes, prompts and chunked prefills) through ``prepare``/``write_kv``/``forward``
    for each claimed dtype, head size, block size, GQA ratios 1/2/4 and, when claimed,
    sliding windows and soft-caps, comparing with paged attention's definition in
    float64 within ``TOLERANCES[dtype]``; ``write_kv`` must store exactly this step's
    K/V. ``validate`` must accept every spec it runs and refuse, with reasons, specs
    outside its capabilities. Skipped when none of its device types is present here."""
    from tessellm.plugins import get_plugins

    checker = Checker(name, "attention_backend")
    try:
        cls = get_plugins().load("attention_backends", name)
    except Exception as exc:
        checker.crashed("loading the backend", exc)
        return checker.finish()
    if not (isinstance(cls, type) and issubclass(cls, AttentionBackend)):
        checker.fail(f"registered target {cls!r} is not an AttentionBackend subclass")
        return checker.finish()
    caps = cls.capabilities
    if not isinstance(caps, AttentionCapabilities):
        checker.fail(f"capabilities is {caps!r}, not an AttentionCapabilities")
        return checker.finish()
    if not any(d in TOLERANCES for d in caps.dtypes):
        checker.fail(
            f"capabilities claim no dtype the check knows: {sorted(map(str, caps.dtypes))}"
        )
        return checker.finish()
    here = available_device_types()
    claimed = sorted(here) if "*" in caps.device_types else sorted(caps.device_types)
    devices = [t for t in claimed if t in here]
    for device_type in devices or sorted(here)[:1]:
        for why, spec in refusal_specs(caps, device_type):
            try:
                reasons = cls.validate(spec)
            except Exception as exc:
                checker.crashed(f"validate of a spec with {why}", exc)
                continue
            ok = bool(reasons) and all(isinstance(r, str) and r for r in reasons)
            checker.expect(ok, f"validate accepts a spec with {why} (or gives no reason)")
    if not devices:
        return checker.skip(
            f"claims device types {sorted(caps.device_types)}; this machine has {sorted(here)}"
        )
    for device_type in devices:
        for case in plan_cases(caps, device_type):
            try:
                _run_case(checker, cls, case, here[device_type])
            except Exception as exc:
                checker.crashed(f"[{case.label()}]", exc)
    return checker.finish()
