"""The model runner's side of image input: the vision encoder once per image, its rows
kept while a chunked prefill crosses them, and the step's input embeddings with the
image rows in place of the placeholders'."""

from __future__ import annotations

from collections import OrderedDict

import torch

from tessellm.interfaces.multimodal import ImageInput, MultiModalModel
from tessellm.interfaces.schedule import SchedulerOutput


class EncoderCache:
    """Image embeddings by content hash, kept from the chunk that first reaches an image
    until the chunk that passes its end. Entries whose request never comes back (aborted
    or preempted mid-image) are evicted oldest first beyond ``capacity``; an evicted
    entry that is needed again is simply recomputed, so the bound costs time, never
    correctness."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.encoded = 0  # images run through the encoder (tests read it)

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def drop(self, key: bytes) -> None:
        self.entries.pop(key, None)


def has_images(plan: SchedulerOutput) -> bool:
    return any(seq.mm_inputs for seq in plan.seqs)


def step_input_embeds(
    model: MultiModalModel, plan: SchedulerOutput, input_ids: torch.Tensor, cache: EncoderCache
) -> torch.Tensor:
    """``model``'s input embeddings for the step, image rows in place."""
    # (row in the step, image, first image row, last image row + 1) for each overlap.
    pieces: list[tuple[int, ImageInput, int, int]] = []
    missing: dict[bytes, ImageInput] = {}
    base = 0
    for seq in plan.seqs:
        start = seq.start_pos
        end = start + len(seq.token_ids)
        for image in seq.mm_inputs:
            lo, hi = max(start, image.offset), min(end, image.end)
            if lo >= hi:
                continue
            pieces.append((base + lo - start, image, lo - image.offset, hi - image.offset))
            if cache.get(image.content_hash) is None:
                missing[image.content_hash] = image
        base += len(seq.token_ids)
    if missing:
        encoded = model.embed_images(list(missing.values()))
        cache.encoded += len(missing)
        for key, rows in zip(missing, encoded, strict=True):
            cache.put(key, rows)
    embeds = model.embed_input_ids(input_ids)
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    device = embeds.device
    for row, image, first, last in pieces:
        rows = cache.get(image.content_hash)
        if rows is None:  # evicted by a bigger step's entries: encode it again
            rows = model.embed_images([image])[0]
            cache.put(image.content_hash, rows)
        sources.append(rows[first:last])
        targets.append(torch.arange(row, row + last - first, device=device))
    if targets:
        embeds[torch.cat(targets)] = torch.cat(sources).to(device=device, dtype=embeds.dtype)
    # The chunk that reaches an image's end is its last user (a preempted request that
    # computes the image again just encodes it again).
    for _, image, _, last in pieces:
        if last == image.length:
            cache.drop(image.content_hash)
    return embeds
