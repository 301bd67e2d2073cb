"""``check_platform``: a registered platform's declared facts and cheap detection."""

from __future__ import annotations

import time

import torch

from tessellm.interfaces.platform import Platform
from tessellm.testing.conformance.result import Checker, CheckResult

# ``is_available`` runs for every installed platform each time an engine starts.
MAX_DETECTION_SECONDS = 1.0
CLASS_ATTRIBUTES: tuple[tuple[str, type], ...] = (
    ("name", str),
    ("device_type", str),
    ("priority", int),
    ("distributed_backend", str),
    ("attention_backends", tuple),
)


def _check_declarations(checker: Checker, cls: type[Platform], name: str, plugins) -> None:
    for attr, kind in CLASS_ATTRIBUTES:
        value = getattr(cls, attr, None)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        checker.expect(ok, f"class attribute {attr} is {value!r}, not a {kind.__name__}")
    checker.expect(
        getattr(cls, "name", None) == name,
        f"name is {getattr(cls, 'name', None)!r} but the platform is registered as {name!r}",
    )
    backends = getattr(cls, "attention_backends", ())
    if checker.expect(bool(backends), "attention_backends is empty: no backend can serve it"):
        for backend in backends if isinstance(backends, tuple) else ():
            checker.expect(
                plugins.get("attention_backends", backend) is not None,
                f"attention backend {backend!r} (in attention_backends) is not registered: "
                "install its plugin or drop it from the list",
            )


def _check_detection(checker: Checker, cls: type[Platform]) -> bool | None:
    """``is_available()``: a bool, quickly, never raising. None when it failed."""
    start = time.perf_counter()
    try:
        available = cls.is_available()
    except Exception as exc:
        checker.crashed("is_available()", exc)
        return None
    elapsed = time.perf_counter() - start
    checker.expect(
        elapsed < MAX_DETECTION_SECONDS,
        f"is_available() took {elapsed:.2f} s (limit {MAX_DETECTION_SECONDS} s): it runs "
        "for every installed platform at each engine start",
    )
    if not isinstance(available, bool):
        checker.fail(f"is_available() returned {available!r}, not a bool")
        return None
    return available


def _check_instance(checker: Checker, cls: type[Platform]) -> None:
    platform = cls()
    dtype = platform.default_dtype()
    supported = tuple(platform.supported_dtypes())
    checker.expect(
        all(isinstance(d, torch.dtype) for d in supported) and bool(supported),
        f"supported_dtypes() is {supported!r}, not a non-empty tuple of torch dtypes",
    )
    checker.expect(dtype in supported, f"default_dtype() {dtype} not in supported_dtypes()")
    device = platform.device()
    if checker.expect(isinstance(device, torch.device), f"device() returned {device!r}"):
        checker.expect(
            device.type == cls.device_type,
            f"device() is {device}, but device_type is {cls.device_type!r}",
        )
        probe = torch.arange(4, device=device, dtype=torch.float32).sum()
        checker.expect(float(probe) == 6.0, f"arithmetic on {device} gave {float(probe)}")
    budget = platform.available_kv_cache_bytes(0.5, 0)
    checker.expect(
        isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0,
        f"available_kv_cache_bytes(0.5, 0) returned {budget!r}, not an int >= 0",
    )
    from tessellm.interfaces.ops import FusedOps

    for run_dtype in supported:
        ops = platform.fused_ops(run_dtype)
        checker.expect(
            ops is None or isinstance(ops, FusedOps),
            f"fused_ops({run_dtype}) returned {type(ops).__name__}, not FusedOps or None",
        )
        quant = platform.default_quantization(run_dtype)
        checker.expect(
            quant is None or isinstance(quant, str),
            f"default_quantization({run_dtype}) returned {quant!r}, not a str or None",
        )
    checker.result.checked.append(
        f"{cls.name} on {device}: default {dtype}, {len(supported)} dtypes"
    )


def check_platform(name: str) -> CheckResult:
    """Check the platform registered as ``name``.

    Always: the class attributes (``name`` as registered, ``device_type``, ``priority``,
    ``distributed_backend``, a non-empty ``attention_backends`` whose every entry is
    registered) have their declared types; ``is_available()`` returns a bool in under
    ``MAX_DETECTION_SECONDS`` without raising; when it says no, ``unavailable_reason()``
    is a non-empty str and the check is skipped with that reason. When available: an
    instance's ``default_dtype()`` is in ``supported_dtypes()``, ``device()`` is a
    ``torch.device`` of ``device_type`` that computes, ``available_kv_cache_bytes``
    returns an int >= 0, and ``fused_ops``/``default_quantization`` return what the
    interface says for every supported dtype."""
    from tessellm.plugins import get_plugins

    checker = Checker(name, "platform")
    plugins = get_plugins()
    try:
        cls = plugins.load("platforms", name)
    except Exception as exc:
        checker.crashed("loading the platform", exc)
        return checker.finish()
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        checker.fail(f"registered target {cls!r} is not a Platform subclass")
        return checker.finish()
    _check_declarations(checker, cls, name, plugins)
    available = _check_detection(checker, cls)
    if available is False:
        try:
            reason = cls.unavailable_reason()
        except Exception as exc:
            checker.crashed("unavailable_reason()", exc)
            return checker.finish()
        if not checker.expect(
            isinstance(reason, str) and bool(reason.strip()),
            f"unavailable_reason() returned {reason!r}, not a non-empty str",
        ):
            return checker.finish()
        return checker.skip(f"not available on this machine: {reason}")
    if available:
        try:
            _check_instance(checker, cls)
        except Exception as exc:
            checker.crashed(f"platform {name!r}", exc)
    return checker.finish()
