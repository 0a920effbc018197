"""Modality map of a Hugging Face VLM prompt: which slots are vision placeholders.

The placeholder ids are read from the model config (never hard-coded): ``image_token_id`` /
``image_token_index`` / ``video_token_id`` / ``video_token_index`` on the top-level config (or its
text config). Everything else (system prompt, role tags, ``<|vision_start|>``/``<|vision_end|>``
markers, timestamps between video frames, the question) is text.
"""

from __future__ import annotations

import torch

from ..policy import ops_backend

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


def modality_map(input_ids: torch.Tensor, vision_ids, attention_mask: torch.Tensor | None = None):
    """[B, N] int8 PAD/TEXT/VISION map of a prompt (see :func:`tgvkv.reference.modality_map`)."""
    if input_ids.dim() != 2:
        raise ValueError(f"tgvkv: input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError("tgvkv: a 2D attention_mask of the same shape as input_ids is needed "
                             f"(got {tuple(attention_mask.shape)} vs {tuple(input_ids.shape)})")
        attention_mask = attention_mask.to(input_ids.device)
    mod = ops_backend().modality_map(input_ids, [int(t) for t in vision_ids], attention_mask)
    return mod.to(input_ids.device)
