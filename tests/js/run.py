"""Runs one of the OpenAI JavaScript client scripts here with node, as the client tests do."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_script(name: str, base_url: str, api_key: str) -> dict:
    """``node <name> <base_url> <api_key>``; the script prints one JSON object."""
    assert (HERE / "node_modules" / "openai").exists(), "run `make test` (it installs the npm client)"
    out = subprocess.run(["node", str(HERE / name), base_url, api_key], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
