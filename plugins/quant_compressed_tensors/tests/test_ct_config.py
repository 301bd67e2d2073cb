"""Reading ``quantization_config``s as llm-compressor writes them (built with the
compressed-tensors library's presets): the scheme each one runs, and the refusals, each
naming what is not supported."""

from __future__ import annotations

import copy

import pytest
from quant_ct_checkpoints import quant_config_dict, scheme

from tessellm_quant_compressed_tensors.method import CompressedTensors


def config_of(preset: str, fmt: str, **weights) -> dict:
    return quant_config_dict(scheme(preset, **weights), fmt)


@pytest.mark.parametrize(
    ("preset", "fmt", "weights", "kind", "bits", "group", "sym"),
    [
        ("W4A16", "pack-quantized", {}, "wna16", 4, 128, True),
        ("W4A16_ASYM", "pack-quantized", {"group_size": 32}, "wna16", 4, 32, False),
        ("W4A16", "pack-quantized", {"strategy": "channel"}, "wna16", 4, -1, True),
        ("W8A16", "pack-quantized", {"group_size": 64}, "wna16", 8, 64, True),
        ("W8A16", "pack-quantized", {"strategy": "channel"}, "wna16", 8, -1, True),
        ("W8A8", "int-quantized", {}, "int8_w8a8", 8, -1, True),
        ("FP8_DYNAMIC", "float-quantized", {}, "fp8_w8a8", 8, -1, True),
        ("FP8", "float-quantized", {}, "fp8_w8a8", 8, -1, True),
        ("W4A16", "pack-quantized", {"actorder": "weight"}, "wna16", 4, 128, True),
    ],
)
def test_llm_compressor_presets_are_read(preset, fmt, weights, kind, bits, group, sym):
    method = CompressedTensors.from_config(config_of(preset, fmt, **weights))
    assert method.scheme.kind == kind
    assert (method.scheme.bits, method.scheme.group_size, method.scheme.symmetric) == (
        bits,
        group,
        sym,
    )
    assert method.scheme.static_activations == (preset == "FP8")
    assert method.capabilities.checkpoint_formats == ("compressed-tensors",)


def test_no_config_gives_the_w4a16_preset():
    method = CompressedTensors.from_config(None)
    assert method.scheme.kind == "wna16"
    assert (method.scheme.bits, method.scheme.group_size, method.scheme.symmetric) == (
        4,
        128,
        True,
    )
    assert method.scheme.format == "pack-quantized"


def test_fp8_needs_ada_on_cuda_and_int8_turing():
    fp8 = CompressedTensors.from_config(config_of("FP8_DYNAMIC", "float-quantized"))
    assert fp8.validate("cuda", fp8.capabilities.dtypes[0], (8, 0))
    assert not fp8.validate("cuda", fp8.capabilities.dtypes[0], (9, 0))
    assert not fp8.validate("cpu", fp8.capabilities.dtypes[0])
    w4 = CompressedTensors.from_config(None)
    assert not w4.validate("cuda", w4.capabilities.dtypes[0], (7, 0))


def with_groups(config: dict, **groups: dict) -> dict:
    config = copy.deepcopy(config)
    config["config_groups"] = groups
    return config


W4 = config_of("W4A16", "pack-quantized", group_size=32)
W8A8 = config_of("W8A8", "int-quantized")


def _refusals():
    mixed = with_groups(
        W4,
        group_0={**W4["config_groups"]["group_0"], "targets": ["re:.*mlp.*"]},
        group_1={**W8A8["config_groups"]["group_0"], "targets": ["re:.*self_attn.*"]},
    )
    g256 = copy.deepcopy(W4)
    g256["config_groups"]["group_0"]["weights"]["group_size"] = 256
    actorder = copy.deepcopy(W4)
    actorder["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    asym_acts = copy.deepcopy(W8A8)
    asym_acts["config_groups"]["group_0"]["input_activations"]["symmetric"] = False
    named_target = copy.deepcopy(W4)
    named_target["config_groups"]["group_0"]["targets"] = ["model.layers.0.self_attn.q_proj"]
    return [
        ("nvfp4", config_of("NVFP4", "nvfp4-pack-quantized"), "float4 tensor_group"),
        ("fp8 block", config_of("FP8_BLOCK", "float-quantized"), "block-wise.*block"),
        ("W4A8", config_of("W4A8", "pack-quantized"), "quantized activations.*int4"),
        ("W2A16", config_of("W2A16", "pack-quantized"), "2-bit packed"),
        ("W4AFP8", config_of("W4AFP8", "pack-quantized"), "activations.*float8"),
        ("group 256", g256, "group size 256"),
        ("mixed", mixed, "mixed precision.*group_0.*group_1"),
        ("actorder group", actorder, "activation ordering 'group'"),
        ("asymmetric activations", asym_acts, "activations must be symmetric.*asymmetric"),
        ("named target", named_target, "target 'model.layers.0.self_attn.q_proj'"),
        ("2:4 sparse", {**W4, "sparsity_config": {"format": "sparse-24-bitmask"}}, "sparse"),
        ("transforms", {**W4, "transform_config": {"config_groups": {"u": {}}}}, "transform"),
        ("ignored decoder layer", {**W4, "ignore": ["lm_head", "re:.*down_proj"]}, "down_proj"),
        (
            "ignored named layer",
            {**W4, "ignore": ["lm_head", "model.layers.5.self_attn.o_proj"]},
            "layers.5.self_attn.o_proj",
        ),
        ("quantized lm_head", {**W4, "ignore": []}, "lm_head"),
        ("another method", {**W4, "quant_method": "gptq"}, "'gptq'"),
    ]


@pytest.mark.parametrize(("what", "config", "message"), _refusals(), ids=lambda v: str(v)[:24])
def test_unsupported_configs_are_refused_naming_the_scheme(what, config, message):
    with pytest.raises(ValueError, match=f"^compressed-tensors: .*{message}"):
        CompressedTensors.from_config(config)


def test_ignoring_what_is_outside_the_decoder_is_fine():
    config = {**W4, "ignore": ["lm_head", "re:.*vision_tower.*", "model.embed_tokens"]}
    assert CompressedTensors.from_config(config).scheme.kind == "wna16"
