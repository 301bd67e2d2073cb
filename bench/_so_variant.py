"""Run bench/structured_outputs.py with the fill overlap's row threshold set (A/B)."""

import runpy
import sys

import tessellm.engine.structured_output as so

so.OVERLAP_MIN_ROWS = int(sys.argv.pop(1))
runpy.run_path("bench/structured_outputs.py", run_name="__main__")
