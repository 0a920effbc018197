"""The package's shape: `import tgvkv` stays light (no test oracle, no transformers), the baselines
are importable by name, the moved modules keep their old names as aliases."""

import subprocess
import sys

import pytest


def _fresh(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_import_tgvkv_does_not_import_the_reference_or_transformers():
    out = _fresh("import sys, tgvkv; tgvkv.TGVKV(keep_ratio=0.1); import tgvkv.presses; "
                 "print(sorted(m for m in sys.modules if m == 'tgvkv.reference' "
                 "or m.split('.')[0] == 'transformers'))")
    assert out == "[]", out


def test_baselines_importable_by_name_and_through_the_registry():
    from tgvkv import eval as tgvkv_eval
    from tgvkv import presses
    from tgvkv.presses.pyramidkv import PyramidKV
    from tgvkv.presses.snapkv import SnapKV

    assert tgvkv_eval.policy_class("snapkv") is SnapKV is presses.SnapKV
    assert tgvkv_eval.policy_class("pyramidkv") is PyramidKV
    p = PyramidKV(0.5, 4, 8, 5, 10.0)
    assert (p.keep_ratio, p.n_sink, p.window, p.kernel, p.beta) == (0.5, 4, 8, 5, 10.0)
    assert p == PyramidKV(keep_ratio=0.5, window=8, beta=10.0)
    with pytest.raises(ValueError, match="keep_ratio"):
        SnapKV(keep_ratio=0.0)


def test_moved_modules_keep_their_old_names():
    pytest.importorskip("transformers")
    import tgvkv.cli
    import tgvkv.bench.cli
    import tgvkv.testing
    from tgvkv.hf import tiny

    assert tiny.build is tgvkv.testing.build and tiny.make_inputs is tgvkv.testing.make_inputs
    assert tgvkv.cli.main is tgvkv.bench.cli.main


def test_supported_transformers_range_is_the_same_everywhere():
    # setup.py's extras pin, the range tgvkv.hf warns outside of, and the README's statement must
    # move together when a new transformers release is tested (CI reads the oldest from setup.py).
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pin = re.search(r'"transformers>=([0-9.]+),<=([0-9.]+)"', (root / "setup.py").read_text())
    assert pin, "setup.py: no transformers>=A,<=B pin"
    lo, hi = pin.groups()
    patch = (root / "src/tgvkv/hf/patch.py").read_text()
    assert f'TRANSFORMERS_MIN, TRANSFORMERS_MAX = "{lo}", "{hi}"' in patch
    readme = (root / "README.md").read_text()
    assert f"(transformers `>={lo},<={hi}`; CI runs the Hugging Face tests on both\nends, {lo}.0 and {hi};" \
        in readme
    assert readme.count(f"transformers {lo}–{hi}") == 2
