"""Peak resident memory of loading a model (no KV cache, no generation), in one process.

``python load_memory.py MODEL DTYPE QUANTIZATION`` prints one JSON line: the peak RSS
(``ru_maxrss``) before and after building the model runner, its parameter and buffer
bytes, and the load time. Run each configuration in a fresh process (the peak is per
process). ``QUANTIZATION`` ``auto`` leaves the choice to the engine (``gguf`` for a GGUF
file with the gguf plugin installed).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def peak_mib() -> float:
    """This process's peak RSS: ``VmHWM`` (reset by exec; ``ru_maxrss`` is not, so a
    child of a large process would report its parent's size), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(model: str, dtype: str, quantization: str) -> dict:
    import torch  # noqa: F401 - counted in the baseline
    import transformers  # noqa: F401 - both paths import it; keep it out of the delta

    from tessellm import model_loader as ml
    from tessellm.config import EngineArgs
    from tessellm.engine.model_runner import ModelRunner
    from tessellm.model_loader import resolve_model
    from tessellm.plugins import get_plugins

    kwargs = {} if quantization == "auto" else {"quantization": quantization}
    args = EngineArgs(model=model, dtype=dtype, device="cpu", **kwargs)
    resolved = resolve_model(get_plugins(), args.model, args.cache_dir)
    before = peak_mib()
    start = time.perf_counter()
    runner = ModelRunner(args, resolved)
    seconds = time.perf_counter() - start
    return {
        "model": model,
        "dtype": dtype,
        "method": runner.quantization,
        "baseline_peak_mib": round(before, 1),
        "peak_mib": round(peak_mib(), 1),
        "model_mib": round(ml.model_bytes(runner.model) / 2**20, 1),
        "load_s": round(seconds, 2),
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
