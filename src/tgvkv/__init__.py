"""tgvkv: TGV-KV text-grounded KV-cache eviction for vision-language models.

The compiled part (``tgvkv._C``) registers the ops under ``torch.ops.tgvkv``; this package
re-exports typed wrappers of them (:mod:`tgvkv.ops`), the modality helpers and ``build_info()``.
"""

import logging as _logging

import torch as _torch

# the "tgvkv" logger (eviction summaries at INFO) is silent unless the application configures it
_logging.getLogger("tgvkv").addHandler(_logging.NullHandler())


def _load_extension():
    try:
        from . import _C  # noqa: F401  (registers torch.ops.tgvkv.*)
    except ImportError as e:  # missing build, or an ABI mismatch with the running torch
        raise ImportError(
            "tgvkv: the compiled extension tgvkv._C could not be loaded (%s). Build it against "
            "the torch you run (torch %s): `pip install --no-build-isolation .` (or `-e .`) in "
            "the tgvkv source tree." % (e, _torch.__version__)) from e
    built = _C.build_info().get("torch_version", "unknown")
    if built.split("+")[0] != _torch.__version__.split("+")[0]:
        raise ImportError(
            "tgvkv: the compiled extension was built against torch %s but torch %s is running; "
            "rebuild it: `pip install --no-build-isolation --force-reinstall --no-deps .`"
            % (built, _torch.__version__))
    return _C


_C = _load_extension()

from . import ops  # noqa: E402
from .ops import (  # noqa: E402
    PAD, TEXT, VISION, compact_, decode_append_, decode_evict_, decode_evict_layers_, evict,
    evict_from_scores,
    guidance_positions,
    layer_budgets, modality_map, score_text_vision, select_keep,
)

__version__ = _C.build_info().get("version", "0.0.0")


def build_info() -> dict:
    """Build facts of the compiled extension.

    Returns
    -------
    dict
        ``version``, ``torch_version`` (the torch it was compiled against), ``cuda`` (whether CUDA
        kernels are present) and ``cuda_archs`` (their nvcc targets).
    """
    return dict(_C.build_info())


__all__ = [
    "PAD", "TEXT", "VISION", "build_info", "compact_", "decode_append_", "decode_evict_", "decode_evict_layers_", "evict",
    "evict_from_scores", "guidance_positions", "layer_budgets", "modality_map", "ops",
    "score_text_vision", "select_keep",
]

# ---- model layer: policy + Hugging Face wiring (tgvkv/policy.py, tgvkv/hf/) -------------------
# transformers is imported lazily: `import tgvkv` needs only torch.
from .policy import Policy, TGVKV  # noqa: E402


def apply(model, policy):
    """``with tgvkv.apply(model, tgvkv.TGVKV(keep_ratio=0.05)): model.generate(...)``.

    Patches a supported Hugging Face model for the ``with`` block (see :mod:`tgvkv.hf`)."""
    from .hf import apply as _apply

    return _apply(model, policy)


def patch(model, policy):
    """Persistent :func:`apply`: returns a handle; ``handle.remove()`` restores the model."""
    from .hf import patch as _patch

    return _patch(model, policy)


__all__ += ["Policy", "TGVKV", "apply", "patch"]
# ---- end of the model-layer block ----------------------------------------------------------------
