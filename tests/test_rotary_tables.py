"""Rotary cos/sin tables are shared by the layers of a model and freed with it."""

from __future__ import annotations

import gc

import torch
from transformers import LlamaConfig

from tessellm.layers import rotary
from tessellm.layers.rotary import RotaryEmbedding


def _config(theta: float) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=theta)


def test_layers_with_the_same_settings_share_one_table():
    a = RotaryEmbedding(_config(10000.0), 16, max_position=128)
    b = RotaryEmbedding(_config(10000.0), 16, max_position=128)
    assert a.cos is b.cos and a.sin is b.sin
    model = torch.nn.ModuleList([a, b])
    assert len(list(model.buffers())) == 2  # one cos and one sin, not one pair per layer
    # Another base or length is another table.
    other_base = RotaryEmbedding(_config(500000.0), 16, max_position=128)
    shorter = RotaryEmbedding(_config(10000.0), 16, max_position=64)
    assert other_base.cos is not a.cos and not torch.equal(other_base.cos, a.cos)
    assert shorter.cos is not a.cos and torch.equal(shorter.cos, a.cos[:64])


def test_shared_table_has_the_per_layer_values_and_is_freed_with_the_layers():
    layer = RotaryEmbedding(_config(10000.0), 16, max_position=37)  # a length no other test uses
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    freqs = torch.outer(torch.arange(37, dtype=torch.float32), inv_freq)
    assert torch.equal(layer.cos, freqs.cos()) and torch.equal(layer.sin, freqs.sin())

    # The tables of this length only: collecting may free other tests' leftovers too.
    def ours() -> int:
        return sum(key[2] == 37 for key in list(rotary._TABLES.keys()))

    assert ours() == 2
    del layer
    gc.collect()
    assert ours() == 0
