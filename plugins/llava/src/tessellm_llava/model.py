"""LLaVA: a CLIP vision tower, a two-layer projector, and a text decoder family.

The language model is whatever tessellm family serves the text config (Llama for
LLaVA 1.5; Mistral, Qwen2 ... for other LLaVA checkpoints), built through the plugin
registry, so its layers are the core's shared decoder and run tensor-parallel. The
projector is built from tessellm's parallel linears. The vision tower is transformers'
own module (``AutoModel.from_config`` of the vision config, as transformers builds it),
replicated on every tensor-parallel rank: it runs once per image, so it is not where
decode time goes, and using the reference module keeps the image rows exactly
transformers'.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tessellm import model_loader as ml
from tessellm.errors import ConfigError
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.cache_spec import LayerCacheSpec, model_cache_specs
from tessellm.interfaces.model import AttentionRequirements, ModelContext
from tessellm.interfaces.multimodal import ImageInput, MultiModalModel
from tessellm.layers.decoder import DecoderForCausalLM
from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear
from tessellm.layers.weight_loading import load_by_rules
from tessellm.plugins import get_plugins


def text_model_config(config: Any) -> Any:
    """The text config, naming the causal-LM architecture that serves it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text = copy.deepcopy(config.text_config)
    if not getattr(text, "architectures", None):
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.model_type)
        if arch is None:
            raise ConfigError(f"no causal-LM architecture for text model {text.model_type!r}")
        text.architectures = [arch if isinstance(arch, str) else arch[0]]
    return text


def text_model_class(config: Any) -> tuple[type[nn.Module], Any]:
    text = text_model_config(config)
    return ml.model_class(get_plugins(), text), text


class LlavaProjector(nn.Module):
    """``linear_2(act(linear_1(x)))``: vision features to the text model's width."""

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        layers = config.vision_feature_layer
        num_layers = 1 if isinstance(layers, int) else len(layers)
        width = config.text_config.hidden_size
        bias = bool(getattr(config, "multimodal_projector_bias", True))
        in_features = config.vision_config.hidden_size * num_layers
        self.linear_1 = ColumnParallelLinear(in_features, width, ctx, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = RowParallelLinear(width, width, ctx, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(nn.Module, MultiModalModel):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        from transformers import AutoModel

        self.config = config
        self.dtype = ctx.dtype
        text_cls, text_config = text_model_class(config)
        if not issubclass(text_cls, DecoderForCausalLM):
            raise ConfigError(
                f"LLaVA's language model must be a family on tessellm's shared decoder "
                f"(DecoderForCausalLM); {text_cls.__name__} is not"
            )
        self.vision_tower = AutoModel.from_config(config.vision_config).to(ctx.dtype).eval()
        self.vision_tower.requires_grad_(False)
        self.multi_modal_projector = LlavaProjector(config, ctx)
        self.language_model = text_cls(text_config, ctx)
        self.vocab_size = text_config.vocab_size
        self.patch_size = config.vision_config.patch_size

    # -- the contract's classmethods -------------------------------------------------------
    @classmethod
    def attention_requirements(cls, config: Any) -> AttentionRequirements:
        text_cls, text = text_model_class(config)
        return text_cls.attention_requirements(text)

    @classmethod
    def cache_specs(cls, config: Any) -> list[LayerCacheSpec]:
        text_cls, text = text_model_class(config)
        return model_cache_specs(text_cls, text)

    @classmethod
    def image_token_id(cls, config: Any) -> int:
        return int(config.image_token_id)

    @classmethod
    def num_image_tokens(cls, config: Any, image: ImageInput) -> int:
        patch = config.vision_config.patch_size
        height, width = image.pixel_values.shape[-2:]
        cls_row = 1 if config.vision_feature_select_strategy == "full" else 0
        return (height // patch) * (width // patch) + cls_row

    # -- images --------------------------------------------------------------------------
    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = self.config.vision_feature_layer
        picked = [layers] if isinstance(layers, int) else list(layers)
        states = [out.hidden_states[i] for i in picked]
        if self.config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]  # the CLS row
        return torch.cat(states, dim=-1)

    def embed_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        device = next(self.multi_modal_projector.parameters()).device
        out: list[torch.Tensor | None] = [None] * len(images)
        # One vision-tower batch per pixel shape (CLIP processors give one shape).
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(tuple(image.pixel_values.shape), []).append(i)
        for indices in by_shape.values():
            pixels = torch.stack([images[i].pixel_values for i in indices])
            features = self._features(pixels.to(device=device, dtype=self.dtype))
            n, rows, width = features.shape
            projected = self.multi_modal_projector(features.reshape(n * rows, width))
            for i, rows_of in zip(indices, projected.reshape(n, rows, -1), strict=True):
                out[i] = rows_of
        return [t for t in out if t is not None]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Image tokens may lie past the vocabulary (their rows are replaced anyway).
        return self.language_model.embed_input_ids(input_ids.clamp(max=self.vocab_size - 1))

    # -- text ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.language_model(input_ids, positions, metadata, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    # -- weights -------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        text: list[tuple[str, torch.Tensor]] = []
        projector: list[tuple[str, torch.Tensor]] = []
        vision: list[tuple[str, torch.Tensor]] = []
        for name, tensor in weights:
            part, rest = split_checkpoint_name(name)
            if part == "language_model":
                text.append((rest, tensor))
            elif part == "multi_modal_projector":
                projector.append((rest, tensor))
            elif part == "vision_tower":
                vision.append((rest, tensor))
        loaded = {f"language_model.{n}" for n in self.language_model.load_weights(text)}
        loaded |= {
            f"multi_modal_projector.{n}"
            for n in load_by_rules(self.multi_modal_projector, projector)
        }
        loaded |= {f"vision_tower.{n}" for n in self._load_vision(vision)}
        return loaded

    def _load_vision(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.vision_tower.named_parameters())
        loaded = set()
        for name, tensor in weights:
            # transformers 4 checkpoints nest the tower in ``vision_model.``; 5 does not.
            for candidate in (name, name.removeprefix("vision_model."), f"vision_model.{name}"):
                param = params.get(candidate)
                if param is not None:
                    if param.shape != tensor.shape:
                        raise ConfigError(
                            f"vision_tower.{candidate}: checkpoint shape {tuple(tensor.shape)}, "
                            f"model {tuple(param.shape)}"
                        )
                    param.data.copy_(tensor.to(param.dtype))
                    loaded.add(candidate)
                    break
        return loaded


def split_checkpoint_name(name: str) -> tuple[str, str]:
    """(part, the name within it) for LLaVA checkpoints of either layout: transformers 4's
    ``language_model.model.*`` / ``language_model.lm_head.*`` / ``vision_tower.*``, and
    the newer ``model.language_model.*`` (the bare decoder) with a top-level ``lm_head``."""
    if name.startswith("lm_head."):
        return "language_model", name
    if name.startswith("model.") and name.split(".", 2)[1] in (
        "language_model",
        "vision_tower",
        "multi_modal_projector",
    ):
        part, rest = name[len("model.") :].split(".", 1)
        if part == "language_model":  # the bare decoder's names
            return part, f"model.{rest}"
        return part, rest
    part, _, rest = name.partition(".")
    if part == "language_model" and not rest.startswith(("model.", "lm_head.")):
        return part, f"model.{rest}"
    return part, rest
