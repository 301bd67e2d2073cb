"""Per-request sampling parameters, named as in vLLM."""

from __future__ import annotations

import json as _json
import math
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tessellm.errors import InvalidRequestError

if TYPE_CHECKING:
    from tessellm.interfaces.structured_output import GrammarSpec

# Bounds that hold whatever the model; the engine checks token ids, top_k and logprobs
# against the model's vocabulary and its own limits when a request is added.
MAX_TOKEN_ID = 2**31 - 1  # no vocabulary is larger; beyond it int64 index math overflows
MAX_COUNT = 2**31 - 1  # max_tokens, min_tokens, logprobs (the context length bounds them)
MAX_N = 1024  # completions of one request: each is a sequence in the engine
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; signed keeps it portable


def _integer(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as a plain ``int`` within ``[low, high]`` (numpy integers too)."""
    if isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise InvalidRequestError(f"{name} must be in [{low}, {high}], got {number}")
    return number


def _real(name: str, value: Any) -> float:
    """``value`` as a finite ``float``: NaN or infinity would poison a whole batch's logits."""
    if isinstance(value, (bool, str, bytes)):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
    return number


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(slots=True)
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's ``StructuredOutputsParams``): exactly one of
    ``json`` (a JSON schema, as a dict or JSON text), ``json_object`` (any JSON object),
    ``regex``, ``choice`` (one of these strings), ``grammar`` (in the backend's syntax) or
    ``structural_tag`` (vLLM's structural-tag JSON). ``backend`` picks a grammar backend
    for this request (default: the engine's ``structured_outputs_backend``)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    backend: str | None = None

    def __post_init__(self) -> None:
        self.spec()  # checks that exactly one constraint is given, well typed

    def spec(self) -> GrammarSpec:
        """The canonical :class:`GrammarSpec` (``InvalidRequestError`` if malformed)."""
        from tessellm.interfaces.structured_output import GrammarSpec

        given = [
            name
            for name in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
            if getattr(self, name) not in (None, False)
        ]
        if len(given) != 1:
            raise InvalidRequestError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, "
                f"grammar or structural_tag; got {', '.join(given) or 'none'}"
            )
        _flag("disable_any_whitespace", self.disable_any_whitespace)
        if self.backend is not None and not isinstance(self.backend, str):
            raise InvalidRequestError("structured_outputs.backend must be a string")
        kind = given[0]
        value = getattr(self, kind)
        any_ws = not self.disable_any_whitespace
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = _json.loads(value)
                except ValueError as exc:
                    raise InvalidRequestError(
                        f"structured_outputs.json is not JSON: {exc}"
                    ) from None
            if not isinstance(value, dict | bool):
                raise InvalidRequestError("structured_outputs.json must be a JSON schema object")
            # The schema's own key order: grammars write properties in it.
            return GrammarSpec("json", _json.dumps(value), any_ws)
        if kind == "json_object":
            _flag("json_object", value)
            return GrammarSpec("json_object", "", any_ws)
        if kind == "choice":
            if not isinstance(value, list | tuple) or not value:
                raise InvalidRequestError("structured_outputs.choice must be a non-empty list")
            if not all(isinstance(c, str) for c in value):
                raise InvalidRequestError("structured_outputs.choice must list strings")
            return GrammarSpec("choice", _json.dumps(list(value)), any_ws)
        if not isinstance(value, str) or not value:
            raise InvalidRequestError(f"structured_outputs.{kind} must be a non-empty string")
        if kind == "structural_tag":
            try:
                _json.loads(value)
            except ValueError as exc:
                raise InvalidRequestError(f"structured_outputs.structural_tag: {exc}") from None
        return GrammarSpec(kind, value, any_ws)


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request. ``temperature=0`` is greedy.

    Field names and meanings follow vLLM's ``SamplingParams`` so code switches by import.
    Every field is checked on construction (``InvalidRequestError`` names the field):
    numbers are finite and within range, token ids are non-negative and counts bounded.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        elif self.stop:
            self.stop_strings = list(self.stop)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Check every field, normalising numbers to plain ``int``/``float``."""
        self.n = _integer("n", self.n, 1, MAX_N)
        self.temperature = _real("temperature", self.temperature)
        self.top_p = _real("top_p", self.top_p)
        self.top_k = _integer("top_k (-1 or 0: off)", self.top_k, 0, MAX_TOKEN_ID)
        self.min_p = _real("min_p", self.min_p)
        self.presence_penalty = _real("presence_penalty", self.presence_penalty)
        self.frequency_penalty = _real("frequency_penalty", self.frequency_penalty)
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, 0, MAX_SEED)
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens, 1, MAX_COUNT)
        self.min_tokens = _integer("min_tokens", self.min_tokens, 0, MAX_COUNT)
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs, 0, MAX_COUNT)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _integer("prompt_logprobs", self.prompt_logprobs, 0, MAX_COUNT)
        if self.stop_token_ids is not None:
            self.stop_token_ids = [
                _integer("stop_token_ids", t, 0, MAX_TOKEN_ID) for t in self.stop_token_ids
            ]
        if self.logit_bias is not None:
            self.logit_bias = {
                _integer("logit_bias key", t, 0, MAX_TOKEN_ID): _real("logit_bias value", b)
                for t, b in self.logit_bias.items()
            }
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise InvalidRequestError("structured_outputs must be StructuredOutputsParams")
            self.structured_outputs.spec()
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _flag(name, getattr(self, name))
        checks: list[tuple[bool, str]] = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens must not exceed max_tokens",
            ),
            (all(isinstance(s, str) and s for s in self.stop_strings), "stop must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
