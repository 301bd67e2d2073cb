"""Engine arguments, named as vLLM names them."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    root = os.environ.get("TESSELLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tessellm"
    )
    return Path(root)


DEFAULT_MODEL = "smollm2-135m-instruct"
# The server's request-body bound (tessellm serve --max-request-bytes): room for a
# long-context prompt as text (128k tokens are well under 1 MiB) and inline base64 images.
DEFAULT_MAX_REQUEST_BYTES = 64 << 20
# vLLM's kv_cache_dtype values (tessellm.interfaces.attention.KV_CACHE_DTYPES maps them).
KV_CACHE_DTYPE_NAMES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(slots=True)
class EngineArgs:
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # Whether a step that computes prompt tokens also gives the running requests their
    # decode tokens (docs/scheduling.md). None: the platform's choice (Platform.mixed_batches;
    # the CPU runs prompt work alone, first).
    enable_mixed_batches: bool | None = None
    scheduling_policy: str = "fcfs"
    tensor_parallel_size: int = 1
    # Decoder layers split over this many stages (tessellm.interfaces.pipeline), each of
    # tensor_parallel_size ranks: tp * pp processes in all.
    pipeline_parallel_size: int = 1
    # MoE layers: whole experts spread over the tensor-parallel ranks (attention stays
    # tensor-parallel) instead of a slice of every expert on every rank.
    enable_expert_parallel: bool = False
    device: str = "auto"  # a platform name, or auto
    attention_backend: str | None = None
    quantization: str | None = None
    # KV cache storage: auto (the model's dtype), fp8 (= fp8_e4m3) or fp8_e5m2.
    kv_cache_dtype: str = "auto"
    scheduler: str = "default"
    kv_cache_manager: str = "default"
    # vLLM's name: True puts every attention layer in one KV block table, so windowed layers
    # of a model that also has full-attention layers keep all their blocks (what graph
    # runners and step runners serve); False gives them their own tables that free blocks
    # outside the window (engine/cache_layout.py).
    disable_hybrid_kv_cache_manager: bool = False
    distributed_executor_backend: str | None = None  # None: uniproc at TP 1, mp above
    download_dir: str | None = None
    # A branch, tag or commit of a Hugging Face model ID (None: main).
    revision: str | None = None
    enforce_eager: bool = False
    # Schedule and launch the next step before this one's tokens reach the host, where the
    # executor allows it (GPUs); False keeps the strictly serial loop.
    async_scheduling: bool = True
    max_logprobs: int = 20
    # The grammar backend of structured outputs ("xgrammar", "llguidance", ... as plugins
    # register them); "auto": xgrammar, else llguidance, else the first registered. A
    # request's structured_outputs.backend overrides it.
    structured_outputs_backend: str = "auto"
    # Speculative decoding (vLLM's name and fields): a dict, JSON text or
    # tessellm.interfaces.speculative.SpeculativeConfig, e.g.
    # {"method": "ngram", "num_speculative_tokens": 3}. None: off.
    speculative_config: Any = None
    # Multi-LoRA (vLLM's names): adapters in one batch, ranks up to max_lora_rank;
    # max_cpu_loras adapters kept in host memory (None: max_loras).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    served_model_name: str | None = None
    # What the model runs as (vLLM's name): "generate", "pooling" (embeddings), or "auto"
    # (pooling for encoders, bare decoders and sentence-transformers checkpoints).
    runner: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        from tessellm.errors import ConfigError

        if self.trust_remote_code:
            raise ConfigError("trust_remote_code is not supported: tessellm never runs model code")
        checks = [
            (self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size must be a power of 2"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
            (self.max_num_seqs >= 1, "max_num_seqs must be at least 1"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size must be at least 1"),
            (self.pipeline_parallel_size >= 1, "pipeline_parallel_size must be at least 1"),
            (self.max_loras >= 1, "max_loras must be at least 1"),
            (1 <= self.max_lora_rank <= 512, "max_lora_rank must be in [1, 512]"),
            (
                self.max_model_len is None or self.max_model_len >= 2,
                "max_model_len must be at least 2",
            ),
            (
                self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
                "num_gpu_blocks_override must be at least 1",
            ),
            (
                self.dtype in ("auto", "float32", "float", "bfloat16", "float16", "half"),
                f"unknown dtype {self.dtype!r}",
            ),
            (
                self.kv_cache_dtype in KV_CACHE_DTYPE_NAMES,
                f"unknown kv_cache_dtype {self.kv_cache_dtype!r}: one of "
                + ", ".join(KV_CACHE_DTYPE_NAMES),
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        from tessellm.interfaces.speculative import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

    @property
    def cache_dir(self) -> Path:
        return Path(self.download_dir) if self.download_dir else default_cache_dir()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            from tessellm.errors import ConfigError

            raise ConfigError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)
