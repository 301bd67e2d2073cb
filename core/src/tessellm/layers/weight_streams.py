"""Transforms of a checkpoint's ``(name, tensor)`` stream, applied before loading.

Some checkpoints store what tessellm keeps apart differently: Phi-3 fuses q/k/v (and
gate/up) into one matrix, GPT-2 stores its linear weights transposed (``Conv1D``). A
family rewrites its stream with these generators so that the ordinary name rules of
:mod:`tessellm.layers.weight_loading` apply afterwards, and tensor-parallel sharding
still happens in the layers' own loaders.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

import torch

Weights = Iterable[tuple[str, torch.Tensor]]


def split_fused(weights: Weights, piece: str, parts: Sequence[tuple[str, int]]) -> Iterator:
    """Split tensors whose name contains ``piece`` along dim 0 into ``parts``.

    ``parts`` are ``(replacement piece, rows)`` in checkpoint order: with
    ``piece=".qkv_proj."`` and ``parts=[(".q_proj.", 4096), (".k_proj.", 1024), ...]`` the
    entry ``...qkv_proj.weight`` becomes ``...q_proj.weight``, ``...k_proj.weight``, ...
    Biases split the same way.
    """
    total = sum(rows for _, rows in parts)
    for name, tensor in weights:
        if piece not in name:
            yield name, tensor
            continue
        if tensor.shape[0] != total:
            raise ValueError(f"{name}: fused tensor has {tensor.shape[0]} rows, expected {total}")
        offset = 0
        for new_piece, rows in parts:
            yield name.replace(piece, new_piece), tensor.narrow(0, offset, rows)
            offset += rows


def transpose_matching(weights: Weights, pattern: str) -> Iterator:
    """Transpose the 2-D tensors whose name matches ``pattern`` (``re.search``)."""
    regex = re.compile(pattern)
    for name, tensor in weights:
        if tensor.dim() == 2 and regex.search(name):
            tensor = tensor.t()
        yield name, tensor


def add_prefix(weights: Weights, prefix: str, unless: Sequence[str] = ()) -> Iterator:
    """Prefix names that start neither with ``prefix`` nor with any of ``unless``
    (checkpoints saved from a base model lack the causal-LM wrapper's prefix)."""
    keep = (prefix, *unless)
    for name, tensor in weights:
        yield (name if name.startswith(keep) else prefix + name), tensor
