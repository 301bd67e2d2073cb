"""A GGUF file's tensor table, read without parsing its metadata values.

``gguf.GGUFReader`` turns every metadata value into numpy views, one per vocabulary entry:
seconds for a 50k vocabulary, twenty for Gemma 3's 262k. Loading quantized weights needs
only the architecture name, the alignment and the tensor table, so this reader steps over
the other values (string arrays by their lengths alone) and maps the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Fixed sizes of the scalar metadata value types, by GGUF type id.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor: ``shape`` in torch order (GGUF lists dimensions innermost first),
    ``qtype`` the ``GGMLQuantizationType`` value, ``start``/``n_bytes`` within the file."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    start: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class TensorTable:
    architecture: str
    tensors: tuple[TensorEntry, ...]

    def raw(self, data: np.ndarray, entry: TensorEntry) -> np.ndarray:
        """``entry``'s bytes as ``[*shape[:-1], bytes per row]`` uint8 (a view of ``data``,
        the file's memory map)."""
        rows = data[entry.start : entry.start + entry.n_bytes]
        return rows.reshape(*entry.shape[:-1], -1) if len(entry.shape) > 1 else rows


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.take("<Q")
        text = bytes(self.buf[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def skip_value(self, vtype: int) -> None:
        if vtype == _STRING:
            length = self.take("<Q")
            self.pos += length
        elif vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                for _ in range(count):
                    length = self.take("<Q")
                    self.pos += length
            elif etype in _SCALAR_SIZES:
                self.pos += _SCALAR_SIZES[etype] * count
            else:
                for _ in range(count):
                    self.skip_value(etype)
        elif vtype in _SCALAR_SIZES:
            self.pos += _SCALAR_SIZES[vtype]
        else:
            raise ValueError(f"unknown GGUF metadata value type {vtype} at byte {self.pos}")

    def scalar(self, vtype: int) -> int:
        formats = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
        if vtype not in formats:
            self.skip_value(vtype)
            raise ValueError(f"expected an integer, got GGUF value type {vtype}")
        return self.take(formats[vtype])


def read_tensor_table(path: Path) -> TensorTable:
    """The architecture and tensor table of the GGUF file at ``path`` (version 2 or 3)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        cur.pos = 4
        version = cur.take("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported (2 or later)")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        architecture, alignment = "", DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key, vtype = cur.string(), cur.take("<I")
            if key == "general.architecture" and vtype == _STRING:
                architecture = cur.string()
            elif key == "general.alignment":
                alignment = cur.scalar(vtype)
            else:
                cur.skip_value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            qtype, offset = cur.take("<I"), cur.take("<Q")
            infos.append((name, dims, qtype, offset))
        data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        n_bytes = int(np.prod(dims)) // block * type_size
        shape = tuple(int(d) for d in reversed(dims))
        tensors.append(TensorEntry(name, shape, qtype, data_start + offset, n_bytes))
    return TensorTable(architecture, tuple(tensors))


def map_file(path: Path) -> np.ndarray:
    """The file as a read-only uint8 memory map (tensor bytes are views of it)."""
    return np.memmap(path, dtype=np.uint8, mode="r")
