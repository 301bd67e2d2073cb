"""HF transformers ``generate()`` as its users run it: static batches, left-padded, greedy.

A static batch generates until its longest request has all its tokens, so shorter requests
in the batch waste steps; only the requested output tokens count as useful output.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tessellm.bench.workload import BenchRequest
from tessellm.model_loader import ResolvedModel


def load_hf_model(resolved: ResolvedModel, fmt: Any, dtype: torch.dtype, device: str) -> Any:
    """The reference model from the same checkpoint tessellm loaded."""
    from transformers import AutoModelForCausalLM

    path = resolved.path
    if resolved.format_name == "gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, trust_remote_code=False
        )
    elif resolved.format_name == "safetensors":
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=False
        )
    else:  # any other weight format: build from its config, load the tensors it yields
        config = fmt.load_config(path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = dict(fmt.iter_weights(path, config, dtype))
        model.load_state_dict(state, strict=False)
        model.tie_weights()
    return model.to(device).eval()


def _pad_batch(
    batch: list[BenchRequest], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.input_len for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, req in enumerate(batch):
        ids[row, width - req.input_len :] = torch.tensor(req.prompt_token_ids)
        mask[row, width - req.input_len :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_batch(model: Any, batch: list[BenchRequest], pad_id: int, device: str) -> int:
    """Greedy-generate one static batch; returns the tokens generated per row."""
    ids, mask = _pad_batch(batch, pad_id, device)
    new = max(r.output_len for r in batch)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return int(out.shape[1] - ids.shape[1])


def hf_throughput(
    model: Any, requests: list[BenchRequest], batch_size: int, pad_id: int, device: str, bar=None
) -> dict[str, float]:
    start = time.perf_counter()
    generated = 0
    for lo in range(0, len(requests), batch_size):
        batch = requests[lo : lo + batch_size]
        per_row = generate_batch(model, batch, pad_id, device)
        generated += min(per_row * len(batch), sum(r.output_len for r in batch))
        if bar is not None:
            bar.update(len(batch))
    return {"elapsed_s": time.perf_counter() - start, "output_tokens": generated}


class _TokenClock:
    """A generate() streamer that stamps the time each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first put() is the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_latency_once(
    model: Any, request: BenchRequest, pad_id: int, device: str
) -> tuple[float, list[float]]:
    """Batch-1 greedy generation; returns (start time, arrival time of each token)."""
    ids = torch.tensor([request.prompt_token_ids], device=device)
    clock = _TokenClock()
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=request.output_len,
        min_new_tokens=request.output_len,
        do_sample=False,
        pad_token_id=pad_id,
        streamer=clock,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return start, clock.times
