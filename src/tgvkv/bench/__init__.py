"""``tgvkv-bench``: microbenchmarks of the ops, end-to-end generation and accuracy, one command.

``python -m tgvkv.bench ...`` is the same as the ``tgvkv-bench`` command (:mod:`.cli`). Modules:

- :mod:`.cli` the command line (arguments, the JSON report, the default run);
- :mod:`.ops` the op benchmarks against the plain-PyTorch composition (:mod:`tgvkv.torch_impl`);
- :mod:`.generate` end-to-end ``generate()``; :mod:`.accuracy` the eval harness as a section;
- :mod:`.timing` timers and memory probes; :mod:`.shapes` op shapes and synthetic caches;
- :mod:`.env` device and versions; :mod:`.common` tables and formats; :mod:`.plot` ``--plot``.

Nothing here imports transformers until a model is needed.
"""

from .cli import build_parser, main
from .shapes import DEFAULT_OPS_SHAPE, PRESETS, Shape, make_inputs
from .timing import (Timing, copy_bandwidth_gbs, peak_extra_bytes, sync, time_fn,
                     time_interleaved)

__all__ = ["DEFAULT_OPS_SHAPE", "PRESETS", "Shape", "Timing", "build_parser", "copy_bandwidth_gbs",
           "main", "make_inputs", "peak_extra_bytes", "sync", "time_fn",
           "time_interleaved"]
