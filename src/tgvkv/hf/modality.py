"""Modality map of a Hugging Face VLM prompt: which slots are vision placeholders.

The placeholder ids are read from the model config (never hard-coded): ``image_token_id`` /
``image_token_index`` / ``video_token_id`` / ``video_token_index`` on the top-level config (or its
text config). Everything else (system prompt, role tags, ``<|vision_start|>``/``<|vision_end|>``
markers, timestamps between video frames, the question) is text.
"""

from __future__ import annotations

from ..ops import modality_map  # the one modality map (validates its inputs)

__all__ = ["VISION_ID_ATTRS", "modality_map", "vision_token_ids"]

VISION_ID_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def vision_token_ids(config) -> tuple[int, ...]:
    """The image/video placeholder token ids of a model config (may be empty for a text LLM)."""
    ids: list[int] = []
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for name in VISION_ID_ATTRS:
            try:
                val = getattr(cfg, name, None)
            except Exception:  # some configs raise on unknown attribute_map entries
                val = None
            if isinstance(val, int) and not isinstance(val, bool) and val >= 0 and val not in ids:
                ids.append(val)
    return tuple(ids)
