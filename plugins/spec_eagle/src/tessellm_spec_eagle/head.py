"""The EAGLE-1 head for Llama-style targets, as the published EAGLE-LLaMA heads are laid out
(and as vLLM's ``EagleLlamaForCausalLM`` reads them).

Row ``p`` of the head's input pairs the target's hidden state at position ``p`` (the LM
head's input, which predicts token ``p + 1``) with the embedding of token ``p + 1``:
``fc`` maps their concatenation ``[embedding; hidden]`` (2h) to h, one Llama decoder layer
runs at position ``p`` over the head's own KV cache, and the layer's output (no final
norm) goes through the target's LM head to guess token ``p + 2``. The first layer has no
input norm (EAGLE's ``cnets.py`` skips it). The embedding and the LM head are the
target's: a checkpoint's ``embed_tokens`` copy is not loaded.

Checkpoint: a directory with ``config.json`` (``LlamaForCausalLM``, usually
``num_hidden_layers=1``) and safetensors with ``fc.weight`` (``[h, 2h]``), optionally
``fc.bias``, and ``layers.<i>.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
post_attention_layernorm}.weight``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tessellm import model_loader as ml
from tessellm.errors import ConfigError, ModelLoadError
from tessellm.interfaces.attention import AttentionMetadata, kv_cache_torch_dtype
from tessellm.interfaces.model import HiddenStatesSource, ModelContext, ParallelInfo
from tessellm.interfaces.schedule import ScheduledSeq, SchedulerOutput
from tessellm.interfaces.speculative import ProposerContext, SpeculativeConfig
from tessellm.layers.attention import Attention
from tessellm.layers.decoder import DecoderAttention, DecoderLayer, GatedMLP
from tessellm.layers.weight_loading import QKV_GATE_UP_RULES, load_by_rules
from tessellm.selection import QuantizationChoice, build_quantization, choose_attention_backend

logger = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM",)
# Names a head's checkpoint may hold that are the target's here (or not used by EAGLE-1).
SHARED_OR_UNUSED = ("embed_tokens.", "lm_head.", "rotary_emb.inv_freq", "layers.0.input_layernorm.")


class EagleHead(nn.Module):
    """``fc`` (2h to h), then ``num_hidden_layers`` Llama decoder layers, the first
    without its input norm; ``forward`` returns the last layer's output plus its residual
    (the LM head's input, no final norm)."""

    def __init__(self, config: Any, ctx: ModelContext, fc_bias: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=fc_bias, dtype=ctx.dtype)
        self.layers = nn.ModuleList(
            self._layer(config, ctx) for _ in range(config.num_hidden_layers)
        )
        self.layers[0].input_layernorm = nn.Identity()

    @staticmethod
    def _layer(config: Any, ctx: ModelContext) -> DecoderLayer:
        attention_bias = bool(getattr(config, "attention_bias", False))
        attention = DecoderAttention(config, ctx, qkv_bias=attention_bias, o_bias=attention_bias)
        mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            ctx,
            getattr(config, "hidden_act", "silu"),
            bias=bool(getattr(config, "mlp_bias", False)),
        )
        return DecoderLayer(config, ctx, attention, mlp)

    def forward(
        self,
        embeds: torch.Tensor,
        target_hidden: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.fc(torch.cat((embeds, target_hidden), dim=-1))
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        assert residual is not None
        return hidden + residual

    def load_weights(self, weights: dict[str, torch.Tensor]) -> set[str]:
        def skip(name: str) -> bool:
            return any(part in name for part in SHARED_OR_UNUSED)

        named = ((name.removeprefix("model."), tensor) for name, tensor in weights.items())
        return load_by_rules(self, named, QKV_GATE_UP_RULES, (), skip)


class EagleRunner:
    """The head on the target's device, in its dtype, over a KV cache indexed by the
    target's block ids; it shares the target's embedding and LM head, so the target must
    run in the engine's process (``ProposerContext.target``)."""

    def __init__(self, config: SpeculativeConfig, context: ProposerContext) -> None:
        if not config.model:
            raise ConfigError(
                'speculative_config with "method": "eagle" needs a "model": an EAGLE head '
                "trained for the target (a directory in the EAGLE-LLaMA layout)"
            )
        target = context.target
        if target is None:
            raise ConfigError(
                "the eagle proposer reads the target's hidden states in the engine's process: "
                "it needs the uniproc executor (tensor_parallel_size 1)"
            )
        if not isinstance(target.model, HiddenStatesSource):
            raise ConfigError(
                f"{type(target.model).__name__} hands out no hidden states "
                "(tessellm.interfaces.model.HiddenStatesSource): no EAGLE head for it"
            )
        plugins, args = context.plugins, context.args
        resolved = ml.resolve_model(plugins, config.model, args.cache_dir)
        fmt = ml.weight_format(plugins, resolved)
        self.config = fmt.load_config(resolved.path)
        self.path = str(resolved.path)
        architecture = ml.architecture_of(self.config)
        if architecture not in ARCHITECTURES:
            raise ConfigError(
                f"{self.path} is a {architecture}; an EAGLE head here is a "
                f"{' or '.join(ARCHITECTURES)} (EAGLE-1, fc over [embedding; hidden])"
            )
        self.target = target
        self.embed = target.model.get_input_embeddings()
        width = self.embed.weight.shape[1]
        if self.config.hidden_size != width:
            raise ConfigError(
                f"the EAGLE head {self.path} has hidden_size {self.config.hidden_size}, the "
                f"target's embedding {width}: the head was trained for another model"
            )
        self.proposable = context.vocab_size
        self.device, self.dtype, self.block_size = target.device, target.dtype, args.block_size
        # Positions the head's rotary table covers, and the target's.
        head_len = getattr(self.config, "max_position_embeddings", None) or context.max_model_len
        self.max_model_len = min(context.max_model_len, int(head_len))
        spec = ml.attention_spec(
            self.config,
            self.device.type,
            self.dtype,
            self.block_size,
            1,
            plugins,
            args.kv_cache_dtype,
        )
        backend_cls, _ = choose_attention_backend(
            plugins, target.platform, spec, args.attention_backend
        )
        self.attention = backend_cls(spec)
        quant = build_quantization(
            plugins, QuantizationChoice("none", "an EAGLE head"), self.device, self.dtype
        )
        ctx = ModelContext(self.dtype, self.device, self.attention, quant, ParallelInfo())
        with target.platform.inference_mode():
            weights = dict(fmt.iter_weights(resolved.path, self.config, self.dtype))
            with torch.device(self.device):
                self.head = EagleHead(self.config, ctx, "fc.bias" in weights).eval()
            self._load(weights, quant)
        self.attn_layers = [m for m in self.head.modules() if isinstance(m, Attention)]
        self.kv_dtype = kv_cache_torch_dtype(args.kv_cache_dtype, self.dtype)

    def _load(self, weights: dict[str, torch.Tensor], quant: Any) -> None:
        if "fc.weight" not in weights and "model.fc.weight" not in weights:
            raise ModelLoadError(
                f"{self.path} has no fc.weight: not an EAGLE head (EAGLE-LLaMA layout: "
                "fc.weight, layers.0.*)"
            )
        loaded = self.head.load_weights(weights)
        missing = sorted({name for name, _ in self.head.named_parameters()} - loaded)
        if missing:
            raise ModelLoadError(f"the EAGLE head {self.path} lacks {', '.join(missing[:5])}")
        for module in self.head.modules():
            if getattr(module, "quant", None) is not None:
                module.quant.process_weights_after_loading(module)
        quant.process_model_after_loading(self.head)

    def bytes_per_block(self) -> int:
        per_token = sum(2 * a.num_kv_heads * a.head_size for a in self.attn_layers)
        return per_token * self.block_size * self.kv_dtype.itemsize

    def initialize_cache(self, num_blocks: int) -> None:
        for layer in self.attn_layers:
            shape = (num_blocks, self.block_size, layer.num_kv_heads, layer.head_size)
            k = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            layer.bind_kv_cache(k, v)

    def run(
        self, seqs: list[ScheduledSeq], target_hidden: torch.Tensor
    ) -> tuple[torch.Tensor, list[int]]:
        """Write the seqs' KV into the head's cache; for each seq, the head's output at its
        last token (the hidden state its next step reads) and the greedy guess from it.
        ``target_hidden`` has a row per token of the seqs, in order."""
        total = sum(len(s.token_ids) for s in seqs)
        with self.target.platform.inference_mode():
            input_ids, positions, metadata, last_rows = self.target.prepare_inputs(
                SchedulerOutput(seqs, total)
            )
            self.attention.prepare(metadata)
            embeds = self.embed(input_ids)
            hidden = target_hidden.to(device=self.device, dtype=self.dtype)
            out = self.head(embeds, hidden, positions, metadata)[last_rows]
            logits = self.target.model.compute_logits(out)
            tokens = torch.argmax(logits[:, : self.proposable], dim=-1).tolist()
        return out, tokens

    def describe(self) -> dict[str, str]:
        return {
            "eagle_model": self.path,
            "eagle_layers": str(len(self.head.layers)),
            "eagle_dtype": str(self.dtype).removeprefix("torch."),
        }
