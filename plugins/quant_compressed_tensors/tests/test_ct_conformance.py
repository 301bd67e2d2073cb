"""Each scheme through tessellm's conformance kit: layers (plain, row split, fused q/k/v
and gate/up) loaded from what ``checkpoint_tensors`` (the compressed-tensors library's
compressors) stores, against the dense product, in each dtype the CPU runs, with the
method's declared ``row_error`` for the scheme."""

from __future__ import annotations

import pytest
from quant_ct_checkpoints import quant_config_dict, scheme, static_int8_scheme

from tessellm.testing import check_quantization_method

CONFIGS = {
    "default (W4A16 g128)": lambda: None,
    "W4A16 asym g32": lambda: quant_config_dict(
        scheme("W4A16_ASYM", group_size=32), "pack-quantized"
    ),
    "W4A16 channel": lambda: quant_config_dict(
        scheme("W4A16", strategy="channel"), "pack-quantized"
    ),
    "W8A16 channel": lambda: quant_config_dict(
        scheme("W8A16", strategy="channel"), "pack-quantized"
    ),
    "W8A16 asym g64": lambda: quant_config_dict(
        scheme("W8A16", group_size=64, symmetric=False), "pack-quantized"
    ),
    "W8A8 int8 dynamic": lambda: quant_config_dict(scheme("W8A8"), "int-quantized"),
    "W8A8 int8 static per-tensor": lambda: quant_config_dict(
        static_int8_scheme("tensor"), "int-quantized"
    ),
    "FP8 dynamic": lambda: quant_config_dict(scheme("FP8_DYNAMIC"), "float-quantized"),
    "FP8 static": lambda: quant_config_dict(scheme("FP8"), "float-quantized"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scheme_conforms(name):
    result = check_quantization_method("compressed-tensors", quant_config=CONFIGS[name]())
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
    assert any("bfloat16" in case for case in result.checked)
    assert any("qkv" in case for case in result.checked)
