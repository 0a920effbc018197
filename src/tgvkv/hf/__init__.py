"""Hugging Face wiring of tgvkv: attention function, cache, modality map (see patch.py)."""

from .cache import EvictionSummary, TGVKVCache, TGVKVLayer
from .modality import modality_map, vision_token_ids
from .patch import (Handle, UnsupportedModelError, apply, cache_arg_name, cache_kwargs,
                    output_cache, patch, supported_models, TEXT_MODEL_TYPES, VLM_MODEL_TYPES)

__all__ = ["EvictionSummary", "TGVKVCache", "TGVKVLayer", "modality_map", "vision_token_ids", "Handle",
           "UnsupportedModelError", "apply", "cache_arg_name", "cache_kwargs", "output_cache",
           "patch", "supported_models", "TEXT_MODEL_TYPES", "VLM_MODEL_TYPES"]
