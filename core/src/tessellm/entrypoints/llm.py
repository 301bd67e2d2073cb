"""The offline API: ``LLM(model=...).generate(prompts, params)``, as in vLLM."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from tessellm.config import EngineArgs
from tessellm.engine.llm_engine import LLMEngine
from tessellm.engine.pooling import PoolingEngine, embed_prompts, refuse_generation, runs_pooling
from tessellm.errors import InvalidRequestError
from tessellm.multimodal.chat import chat_prompt
from tessellm.outputs import RequestOutput
from tessellm.pooling_params import EmbeddingRequestOutput, PoolingParams
from tessellm.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]  # content: a string, or OpenAI content parts (text, images)


class LLM:
    """Offline batched generation. Keyword arguments are ``EngineArgs`` fields."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        if model is not None:
            kwargs["model"] = model
        args = EngineArgs.from_kwargs(**kwargs)
        # An embedding model runs on the pooling engine (no KV cache, one forward).
        self.engine = PoolingEngine(args) if runs_pooling(args) else LLMEngine(args)

    def sleep(self, level: int = 1) -> float:
        """Free the device's memory while idle (vLLM's ``LLM.sleep``): level 1 keeps the
        weights in host memory, level 2 reloads them from the checkpoint on ``wake_up``."""
        return self.engine.sleep(level)

    def wake_up(self) -> float:
        """Restore what ``sleep`` freed; the outputs are the same as before it."""
        return self.engine.wake_up()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
        lora_request: Any = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is text, token ids or
        ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``, either with
        ``"multi_modal_data": {"image": PIL image or list}`` for a model that takes
        images (one image per placeholder of the prompt). ``lora_request``: a
        ``tessellm.lora.LoRARequest`` for every prompt, or one (or None) per prompt."""
        refuse_generation(self.engine)
        batch = _as_batch(prompts)
        params = sampling_params or SamplingParams()
        params_list = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(batch):
            raise InvalidRequestError("give one SamplingParams, or one per prompt")
        # Every grammar compiled first (in parallel, cached): an invalid schema raises
        # before any request runs.
        compiles = [self.engine.compile_structured(p) for p in _distinct_structured(params_list)]
        for future in compiles:
            if future is not None:
                future.result()
        loras = (
            lora_request if isinstance(lora_request, list | tuple) else [lora_request] * len(batch)
        )
        if len(loras) != len(batch):
            raise InvalidRequestError("give one lora_request, or one (or None) per prompt")
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(batch, params_list, strict=True)):
                rank = priority[i] if priority else 0
                ids.append(
                    self.engine.add_request(
                        None,
                        _prompt_input(prompt),
                        p,
                        priority=rank,
                        lora_request=loras[i],
                        multi_modal_data=_multi_modal_data(prompt),
                    )
                )
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, in order (``.outputs.embedding``), as vLLM's."""
        return embed_prompts(
            self.engine, [_prompt_input(p) for p in _as_batch(prompts)], pooling_params
        )

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate. ``tools``
        (OpenAI's function tools, as vLLM's ``LLM.chat`` takes them) go to the template."""
        refuse_generation(self.engine)
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = [
            chat_prompt(
                self.engine,
                lambda flat: apply_chat_template(
                    self.engine.tokenizer, flat, chat_template, add_generation_prompt, tools
                ),
                conv,
            )
            for conv in conversations  # type: ignore[union-attr]
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    results[out.request_id] = out
                    pending.discard(out.request_id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[i] for i in ids]


def apply_chat_template(
    tokenizer: Any,
    messages: list[Message],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise InvalidRequestError(f"invalid message {m!r}: role must be system/user/assistant")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("this model has no chat template; use generate() instead")
    ids = tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        tools=tools,  # OpenAI's function tools, as the template's ``tools``
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _distinct_structured(params_list: list[SamplingParams]) -> list[SamplingParams]:
    """One of each distinct ``structured_outputs`` among ``params_list``."""
    seen: dict[int, SamplingParams] = {}
    for p in params_list:
        if p.structured_outputs is not None:
            seen.setdefault(id(p.structured_outputs), p)
    return list(seen.values())


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if prompts and isinstance(prompts, list) and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return list(prompts)


def _multi_modal_data(prompt: Prompt) -> dict[str, Any] | None:
    return prompt.get("multi_modal_data") if isinstance(prompt, dict) else None


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        return str(prompt["prompt"])
    return prompt


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generating", file=sys.stderr)
