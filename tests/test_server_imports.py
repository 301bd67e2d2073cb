"""The HTTP stack is an extra: the offline API and the CLI's start-up must not import it."""

from __future__ import annotations

import subprocess
import sys

SERVER_PACKAGES = ("fastapi", "uvicorn", "starlette", "prometheus_client", "sse_starlette")

PROBE = f"""
import sys
from tessellm import LLM, SamplingParams
import tessellm.engine.llm_engine
from tessellm.cli.app import build_app
build_app()
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({SERVER_PACKAGES!r}))
print(",".join(loaded))
"""


def test_offline_api_and_cli_do_not_import_the_server_stack():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
