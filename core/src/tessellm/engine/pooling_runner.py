"""Builds a pooling model on its device and runs one forward over a batch of prompts.

The platform, dtype and quantization are chosen as for generation (``tessellm.selection``);
the model is an encoder family's class, or a decoder family's with its LM head dropped
and its attention run by :class:`NoCacheAttention`. No KV cache is allocated and nothing
outlives a forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from tessellm import model_loader as ml
from tessellm.config import EngineArgs
from tessellm.engine.pooling_attention import NoCacheAttention
from tessellm.errors import ConfigError, ModelLoadError
from tessellm.formats.random_weights import RandomWeights
from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec
from tessellm.interfaces.model import ModelContext, ParallelInfo
from tessellm.interfaces.pooling import is_encoder_class
from tessellm.layers.decoder import DecoderForCausalLM
from tessellm.plugins import PluginSet
from tessellm.selection import (
    build_quantization,
    choose_platform,
    choose_quantization,
    default_dtype_for,
)

logger = logging.getLogger(__name__)


def pooling_model_class(plugins: PluginSet, config: Any) -> tuple[type[nn.Module], bool] | None:
    """The registered class that can pool this config's architecture and whether it is an
    encoder; ``None`` when no installed family can. A bare decoder (``Qwen3Model``) is
    served by the family registered for its causal LM (``Qwen3ForCausalLM``)."""
    arch = ml.architecture_of(config)
    names = [arch]
    if arch.endswith("Model") and not arch.endswith("ForCausalLM"):
        names.append(arch.removesuffix("Model") + "ForCausalLM")
    for name in names:
        registration = plugins.get("models", name)
        if registration is None:
            continue
        cls = registration.load()
        if is_encoder_class(cls):
            return cls, True
        if isinstance(cls, type) and issubclass(cls, DecoderForCausalLM):
            return cls, False
    return None


def model_class_or_error(plugins: PluginSet, config: Any) -> tuple[type[nn.Module], bool]:
    found = pooling_model_class(plugins, config)
    if found is not None:
        return found
    arch = ml.architecture_of(config)
    if plugins.get("models", arch) is None:
        raise ModelLoadError(plugins.missing_message("models", arch))
    raise ModelLoadError(
        f"{arch} cannot run as an embedding model: tessellm pools encoder families and "
        "decoders built on its shared decoder layers"
    )


def decoder_weight_names(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """A bare decoder checkpoint's names (``layers.0...``, as sentence-transformers saves
    ``Qwen3Model``) under the causal LM's ``model.`` prefix; an LM head is left out."""
    for name, tensor in weights:
        if name.startswith("lm_head."):
            continue
        yield (name if name.startswith("model.") else f"model.{name}"), tensor


class PoolingRunner:
    def __init__(self, args: EngineArgs, resolved: ml.ResolvedModel, plugins: PluginSet) -> None:
        if args.tensor_parallel_size != 1:
            raise ConfigError("embedding models run on one device: tensor_parallel_size must be 1")
        self.platform, self.platform_choice = choose_platform(plugins, args.device)
        self.platform.set_up_process()
        self.device = self.platform.device(0)
        torch.manual_seed(args.seed)
        fmt = ml.weight_format(plugins, resolved)
        self.config = config = fmt.load_config(resolved.path)
        model_cls, self.is_encoder = model_class_or_error(plugins, config)
        auto_dtype = default_dtype_for(plugins, self.platform, config, args.quantization)
        self.dtype = ml.resolve_dtype(args.dtype, auto_dtype)
        self.attention = NoCacheAttention(self._attention_spec(model_cls))
        choice = choose_quantization(plugins, self.platform, self.dtype, args.quantization, config)
        self.quantization = choice.name
        quant = build_quantization(plugins, choice, self.device, self.dtype)
        if choice.dequantize:
            config.quantization_config = None
        ctx = ModelContext(self.dtype, self.device, self.attention, quant, ParallelInfo())
        with torch.device(self.device):
            model = model_cls(config, ctx)
        if not self.is_encoder:
            del model.lm_head  # token states are pooled: no logits
        self.model = model.eval()
        weights = fmt.iter_weights(resolved.path, config, self.dtype)
        if not self.is_encoder and not isinstance(weights, RandomWeights):
            weights = decoder_weight_names(weights)
        with self.platform.inference_mode():
            ml.load_weights(self.model, weights)
            quant.process_model_after_loading(self.model)
        # vLLM's defaults where the checkpoint names no pooling: the encoder family's
        # (BERT: CLS), the last token for decoders.
        self.default_pooling: str = model_cls.default_pooling if self.is_encoder else "lasttoken"

    def _attention_spec(self, model_cls: Any) -> AttentionSpec:
        req = model_cls.attention_requirements(self.config)
        spec = AttentionSpec(
            device_type=self.device.type,
            dtype=self.dtype,
            head_size=req.head_size,
            num_heads=req.num_heads,
            num_kv_heads=req.num_kv_heads,
            block_size=1,
            sliding_window=req.sliding_window,
            logits_soft_cap=req.logits_soft_cap,
        )
        reasons = NoCacheAttention.validate(spec)
        if reasons:
            raise ConfigError(
                "the pooling attention cannot serve this model: " + "; ".join(reasons)
            )
        return spec

    def forward(self, prompts: list[list[int]]) -> torch.Tensor:
        """Token states ``[sum of lengths, hidden]`` of ``prompts``, packed in order."""
        self.platform.enter_step_thread()
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
        cu = torch.zeros(len(prompts) + 1, dtype=torch.int32)
        torch.cumsum(lens, 0, out=cu[1:])
        total = int(cu[-1])
        input_ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(len(prompts)), lens)
        positions = torch.arange(total) - cu[:-1].long()[seq]
        dev = self.device
        metadata = AttentionMetadata(
            query_start_loc=cu.to(dev),
            seq_lens=lens.to(dev),
            block_tables=torch.zeros((len(prompts), 0), dtype=torch.int32, device=dev),
            slot_mapping=torch.full((total,), -1, dtype=torch.long, device=dev),
            max_query_len=int(lens.max()),
            max_seq_len=int(lens.max()),
            query_start_loc_cpu=cu,
            seq_lens_cpu=lens,
        )
        with self.platform.inference_mode():
            return self.model(input_ids.to(dev), positions.to(dev), metadata)
