"""How a pooling model turns its token states into one vector per prompt.

The recipe comes from the checkpoint's sentence-transformers files when it has them
(``modules.json``: a ``Transformer``, a ``Pooling`` module whose ``config.json`` names the
modes, an optional ``Normalize``; ``sentence_bert_config.json``: ``max_seq_length``), and
otherwise from the family's default, as vLLM does: CLS for encoders, the last token for
decoders, normalised. Matryoshka models (``is_matryoshka`` or ``matryoshka_dimensions`` in
``config.json``) accept ``dimensions``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tessellm.errors import InvalidRequestError, ModelLoadError

# sentence-transformers' mode names (its Pooling module), in its concatenation order.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The legacy boolean keys of a Pooling config.json, in the same order.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Modules a sentence-transformers pipeline may list that change nothing here.
_NEUTRAL_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    modes: tuple[str, ...]  # concatenated in this order
    normalize: bool
    max_seq_length: int | None = None  # sentence-transformers' truncation length
    matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None
    source: str = "default"  # where the recipe came from, for logs and errors


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from None


def _modes_of(raw: dict[str, Any], file: Path) -> tuple[str, ...]:
    mode = raw.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_KEYS.items() if raw.get(key))
        return modes or ("mean",)  # sentence-transformers' default
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ModelLoadError(f"{file}: unknown pooling mode(s) {unknown}")
    return modes


def sentence_transformers_modules(path: Path) -> list[dict[str, Any]] | None:
    """The ``modules.json`` list of a sentence-transformers checkpoint, else ``None``."""
    file = path / "modules.json" if path.is_dir() else None
    if file is None or not file.exists():
        return None
    modules = _read_json(file)
    return modules if isinstance(modules, list) else None


def has_pooling_module(path: Path) -> bool:
    modules = sentence_transformers_modules(path) or []
    return any(str(m.get("type", "")).rsplit(".", 1)[-1] == "Pooling" for m in modules)


def read_pooling_config(path: Path, config: Any, default_mode: str) -> PoolingConfig:
    """The pooling recipe of the checkpoint at ``path`` (``config``: its HF config;
    ``default_mode``: the family's, for checkpoints without sentence-transformers files)."""
    dims = getattr(config, "matryoshka_dimensions", None)
    matryoshka = dict(
        matryoshka=bool(getattr(config, "is_matryoshka", False) or dims),
        matryoshka_dimensions=tuple(int(d) for d in dims) if dims else None,
    )
    modules = sentence_transformers_modules(path)
    if modules is None:
        return PoolingConfig((default_mode,), normalize=True, **matryoshka)
    modes: tuple[str, ...] | None = None
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _NEUTRAL_MODULES:
            raise ModelLoadError(
                f"{path / 'modules.json'}: the sentence-transformers module {kind!r} "
                f"({module.get('type')}) is not supported; tessellm runs Transformer, "
                "Pooling and Normalize pipelines"
            )
        if kind == "Pooling":
            pooling_file = path / str(module.get("path", "")) / "config.json"
            modes = _modes_of(_read_json(pooling_file), pooling_file)
        normalize = normalize or kind == "Normalize"
    if modes is None:
        raise ModelLoadError(f"{path / 'modules.json'} lists no Pooling module")
    max_len = None
    bert_config = path / "sentence_bert_config.json"
    if bert_config.exists():
        value = _read_json(bert_config).get("max_seq_length")
        max_len = int(value) if value else None
    return PoolingConfig(modes, normalize, max_len, source="sentence-transformers", **matryoshka)


def pool(hidden: torch.Tensor, seq_lens: list[int], modes: tuple[str, ...]) -> torch.Tensor:
    """``hidden`` ``[T, H]`` of packed sequences of ``seq_lens`` → ``[B, H * len(modes)]`` in
    float32, each mode as sentence-transformers' Pooling computes it."""
    hidden = hidden.float()
    device = hidden.device
    lens = torch.tensor(seq_lens, device=device)
    ends = torch.cumsum(lens, 0)
    starts = ends - lens
    batch = len(seq_lens)
    segment: torch.Tensor | None = None
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[starts])
        elif mode == "lasttoken":
            parts.append(hidden[ends - 1])
        else:
            if segment is None:
                segment = torch.repeat_interleave(torch.arange(batch, device=device), lens)
            parts.append(_segment_pool(hidden, segment, starts, lens, mode))
    return torch.cat(parts, dim=-1)


def _segment_pool(
    hidden: torch.Tensor, segment: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, mode: str
) -> torch.Tensor:
    batch, width = lens.shape[0], hidden.shape[1]
    out = hidden.new_zeros(batch, width)
    if mode == "max":
        index = segment[:, None].expand(-1, width)
        return out.fill_(float("-inf")).scatter_reduce_(0, index, hidden, "amax")
    if mode == "weightedmean":
        # Weights 1..len along each prompt, as sentence-transformers' position weights.
        weights = (
            torch.arange(hidden.shape[0], device=hidden.device) - starts[segment] + 1
        ).float()
        summed = out.index_add_(0, segment, hidden * weights[:, None])
        return summed / (lens * (lens + 1) / 2).float()[:, None]
    summed = out.index_add_(0, segment, hidden)
    denominator = lens.float() if mode == "mean" else lens.float().sqrt()
    return summed / denominator[:, None]


def check_dimensions(config: PoolingConfig, dimensions: int | None, width: int) -> None:
    """``InvalidRequestError`` for a ``dimensions`` this model cannot give."""
    if dimensions is None:
        return
    if not config.matryoshka:
        raise InvalidRequestError(
            "this model does not support matryoshka representation: 'dimensions' cannot "
            "change its output size"
        )
    allowed = config.matryoshka_dimensions
    if allowed is not None and dimensions not in allowed:
        raise InvalidRequestError(
            f"dimensions must be one of {list(allowed)} for this model, got {dimensions}"
        )
    if not 1 <= dimensions <= width:
        raise InvalidRequestError(f"dimensions must be in [1, {width}], got {dimensions}")


def finish(pooled: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Cut a pooled row to ``dimensions`` (Matryoshka), then L2-normalise it if asked."""
    if dimensions is not None:
        pooled = pooled[..., :dimensions]
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled
