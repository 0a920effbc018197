"""Every Python block of README.md runs as written, as a user would paste it: each in its own
fresh interpreter, started from an empty folder (so the installed tgvkv is what it imports)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "README.md lost its Python examples"


@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(i, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, "-c", BLOCKS[i]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"README Python block {i} failed:\n{BLOCKS[i]}\n--- stderr\n{p.stderr}"
    assert "Traceback" not in p.stderr
    if "handle.summary()" in BLOCKS[i]:  # the main example prints an answer and the summary
        assert " -> " in p.stdout and "| reference: " in p.stdout, p.stdout
        assert "tgvkv: evicted: kept " in p.stdout, p.stdout
