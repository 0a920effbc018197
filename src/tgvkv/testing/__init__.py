"""Models for tests and benchmarks: every supported architecture built from its config with random
weights (no hub access), tiny (``tiny-llava``, ...) or with the shapes of the published checkpoints
(``llava-1.5-7b``, ...), and padded prompt batches for them. Needs the ``hf`` extra (transformers).

``from tgvkv import testing; model = testing.build("tiny-qwen2.5-vl")``; see :mod:`.models`.
"""

from .models import (IMG, MODEL_CLASSES, PRESETS, TINY, VEND, VID, VOCAB, VSTART, build, config,
                     make_inputs, preset_config, tiny_config)

__all__ = ["IMG", "MODEL_CLASSES", "PRESETS", "TINY", "VEND", "VID", "VOCAB", "VSTART", "build",
           "config", "make_inputs", "preset_config", "tiny_config"]
