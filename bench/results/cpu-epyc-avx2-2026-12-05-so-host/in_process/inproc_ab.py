"""Same-process interleaved A/B of the structured-output host path (raw tool of this
folder's in_process/*.json): the files before 3955fa8 (``git archive 3955fa8~1 core/src
plugins/structured_xgrammar/src | tar -x -C /tmp/so_host/before``), loaded under other
names, swapped into one engine round by round against the working tree's; each round runs
bench/structured_host.py's plain and json rounds. ``python inproc_ab.py 64``."""

import importlib.util
import json
import statistics
import sys
import types

import tessellm.engine.structured_output as new_so
import tessellm_structured_xgrammar.backend as new_be
from tessellm.sampling_params import StructuredOutputsParams

sys.path.insert(0, "bench")  # run from the repository root
BATCH_ARG = sys.argv[1:]
sys.argv = ["x"]
import structured_host as sh  # noqa: E402
from structured_outputs import long_schema  # noqa: E402

B = "/tmp/so_host/before"


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


old_so = load("old_so", f"{B}/core/src/tessellm/engine/structured_output.py")
old_be = load(
    "old_be", f"{B}/plugins/structured_xgrammar/src/tessellm_structured_xgrammar/backend.py"
)
old_sampler = load("old_sampler", f"{B}/core/src/tessellm/engine/sampler.py")
batch = int(BATCH_ARG[0]) if BATCH_ARG else 64
rounds = 9
eng = sh.build(64, 32 + 128 + 16, "random:qwen3-0.6b")
man = eng.structured
new_stacked = sh._stacked_rows
new_new_matcher = new_be.XgrammarGrammar.new_matcher


def old_new_matcher(self):
    return old_be.XgrammarMatcher(self.compiled, self._stop_row)


def variant(name):
    if name == "before":
        for attr in ("fill_bitmasks", "_bitmask_rows", "accept"):
            setattr(man, attr, types.MethodType(getattr(old_so.StructuredOutputManager, attr), man))
        new_be.XgrammarGrammar.new_matcher = old_new_matcher
        sh._stacked_rows = old_sampler._stacked_rows
    else:
        for attr in ("fill_bitmasks", "_bitmask_rows", "accept"):
            man.__dict__.pop(attr, None) if hasattr(man, "__dict__") else None
            setattr(man, attr, types.MethodType(getattr(new_so.StructuredOutputManager, attr), man))
        new_be.XgrammarGrammar.new_matcher = new_new_matcher
        sh._stacked_rows = new_stacked


so = StructuredOutputsParams(json=long_schema(200), disable_any_whitespace=True)
ph = sh.Phases(eng)  # wraps the manager's accept/fill; re-wrapped after each variant switch
res = {v: {"plain": [], "json": []} for v in ("before", "after")}
order = ["after", "before"]
for r in range(rounds + 1):
    for v in order if r % 2 == 0 else order[::-1]:
        variant(v)
        ph = sh.Phases(eng)
        for kind, c in (("plain", None), ("json", so)):
            out = sh.one_round(eng, batch, 128, c, ph)
            if r:
                res[v][kind].append(out)
eng.shutdown()
summary = {}
for v in res:
    extra = [
        j["host_ms"] - p["host_ms"] for p, j in zip(res[v]["plain"], res[v]["json"], strict=True)
    ]
    plain = [p["host_ms"] for p in res[v]["plain"]]
    summary[v] = {
        "plain_host_ms": [
            round(statistics.median(plain), 3),
            round(min(plain), 3),
            round(max(plain), 3),
        ],
        "json_host_ms": [round(statistics.median([j["host_ms"] for j in res[v]["json"]]), 3)],
        "extra_ms": [
            round(statistics.median(extra), 3),
            round(min(extra), 3),
            round(max(extra), 3),
        ],
        "extra_pct": round(100 * statistics.median(extra) / statistics.median(plain), 1),
        "fill_ms": round(statistics.median([j["fill_ms"] for j in res[v]["json"]]), 3),
        "accept_ms": round(statistics.median([j["accept_ms"] for j in res[v]["json"]]), 3),
    }
print(json.dumps({"batch": batch, "rounds": rounds, **summary}, indent=1))
