"""Supported model architectures built from configs with random weights (no hub access needed).

- ``build(name)``: a tiny model (``tiny-llava``, ``tiny-llava-next``, ``tiny-llava-onevision``,
  ``tiny-qwen2-vl``, ``tiny-qwen2.5-vl``, ``tiny-qwen3-vl``, ``tiny-llama``) or a full-size
  architecture preset (``llava-1.5-7b``, ``llava-next-7b``, ``llava-onevision-0.5b``,
  ``qwen2-vl-7b``, ``qwen2.5-vl-7b``, ``qwen3-vl-4b``, ``qwen3-vl-8b``), random weights, eval mode.
- ``make_inputs(model, prompts)``: a padded batch of prompts, each a list of segments: an int
  (that many random text tokens), ``"image"`` / ``("image", (h, w))`` (one image, ``h, w`` in
  patch-grid units for Qwen, pixels for LLaVA) or ``("video", frames)``. Placeholder counts are
  taken from the model's own vision tower, so the inputs are always consistent.

Token ids: text tokens are drawn from ``[16, min(vocab - 16, special ids))``, the special ids live
at the top of the vocabulary and are read back from the config (nothing here is hard-coded in the
model layer).
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 512
IMG, VID, VSTART, VEND = VOCAB - 2, VOCAB - 3, VOCAB - 4, VOCAB - 5


def _llama(**kw):
    d = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    d.update(kw)
    return d


def _clip(image_size=56):
    return tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, image_size=image_size, patch_size=14,
                               projection_dim=32)


def tiny_config(name: str):
    if name == "tiny-llama":
        return tf.LlamaConfig(**_llama())
    if name == "tiny-llava":
        return tf.LlavaConfig(vision_config=_clip(112), text_config=tf.LlamaConfig(**_llama()),
                              image_token_index=IMG, vision_feature_layer=-2,
                              vision_feature_select_strategy="default")
    if name == "tiny-llava-next":
        return tf.LlavaNextConfig(
            vision_config=_clip(56), text_config=tf.LlamaConfig(**_llama()),
            image_token_index=IMG, image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]],
            vision_feature_layer=-2, vision_feature_select_strategy="default")
    if name == "tiny-llava-onevision":
        vis = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=56, patch_size=14)
        txt = tf.Qwen2Config(**_llama())
        return tf.LlavaOnevisionConfig(
            vision_config=vis, text_config=txt, image_token_index=IMG, video_token_index=VID,
            image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]],
            vision_feature_layer=-1, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9")
    if name in ("tiny-qwen2-vl", "tiny-qwen2.5-vl"):
        txt = _llama(hidden_size=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [2, 3, 3]})
        ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART,
                   vision_end_token_id=VEND)
        if name == "tiny-qwen2-vl":
            vis = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
            return tf.Qwen2VLConfig(text_config=txt, vision_config=vis, **ids)
        vis = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                   fullatt_block_indexes=[1])
        return tf.Qwen2_5_VLConfig(text_config=txt, vision_config=vis, **ids)
    if name == "tiny-qwen3-vl":
        txt = _llama(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": [2, 3, 3],
                                                   "mrope_interleaved": True})
        vis = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                   num_position_embeddings=64, deepstack_visual_indexes=[1])
        return tf.Qwen3VLConfig(text_config=txt, vision_config=vis, image_token_id=IMG,
                                video_token_id=VID, vision_start_token_id=VSTART,
                                vision_end_token_id=VEND)
    raise KeyError(name)


def preset_config(name: str):
    """Full-size architecture presets (random weights; the shapes of the published checkpoints)."""
    L7 = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    clip336 = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14,
                                  projection_dim=768)
    if name == "llava-1.5-7b":
        return tf.LlavaConfig(vision_config=clip336, text_config=tf.LlamaConfig(**L7),
                              image_token_index=32000)
    if name == "llava-next-7b":  # llava-v1.6-mistral-7b-hf
        txt = tf.MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                               max_position_embeddings=32768, sliding_window=None,
                               rope_theta=1000000.0)
        return tf.LlavaNextConfig(vision_config=clip336, text_config=txt, image_token_index=32000,
                                  image_grid_pinpoints=[[336, 672], [672, 336], [672, 672],
                                                        [1008, 336], [336, 1008]])
    if name == "llava-onevision-0.5b":
        vis = tf.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                    num_attention_heads=16, image_size=384, patch_size=14)
        txt = tf.Qwen2Config(vocab_size=152000, hidden_size=896, intermediate_size=4864,
                             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             max_position_embeddings=32768, rope_theta=1000000.0)
        return tf.LlavaOnevisionConfig(vision_config=vis, text_config=txt,
                                       vision_feature_layer=-1, tie_word_embeddings=True)
    if name in ("qwen2-vl-7b", "qwen2.5-vl-7b"):
        txt = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   max_position_embeddings=32768,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                    "mrope_section": [16, 24, 24]})
        if name == "qwen2-vl-7b":
            return tf.Qwen2VLConfig(text_config=txt, vision_config=dict(hidden_size=3584))
        vis = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                   out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
        return tf.Qwen2_5_VLConfig(text_config=txt, vision_config=vis)
    if name in ("qwen3-vl-4b", "qwen3-vl-8b"):
        big = name == "qwen3-vl-8b"
        txt = dict(vocab_size=151936, hidden_size=4096 if big else 2560,
                   intermediate_size=12288 if big else 9728, num_hidden_layers=36,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   max_position_embeddings=262144,
                   rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                    "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        vis = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                   out_hidden_size=txt["hidden_size"], deepstack_visual_indexes=[8, 16, 24])
        return tf.Qwen3VLConfig(text_config=txt, vision_config=vis, tie_word_embeddings=not big)
    raise KeyError(name)


TINY = ("tiny-llava", "tiny-llava-next", "tiny-llava-onevision", "tiny-qwen2-vl",
        "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-llama")
PRESETS = ("llava-1.5-7b", "llava-next-7b", "llava-onevision-0.5b", "qwen2-vl-7b",
           "qwen2.5-vl-7b", "qwen3-vl-4b", "qwen3-vl-8b")

MODEL_CLASSES = {
    "llama": tf.LlamaForCausalLM, "llava": tf.LlavaForConditionalGeneration,
    "llava_next": tf.LlavaNextForConditionalGeneration,
    "llava_onevision": tf.LlavaOnevisionForConditionalGeneration,
    "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
}


def config(name: str):
    return tiny_config(name) if name.startswith("tiny-") else preset_config(name)


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu",
          attn_implementation: str = "sdpa", cfg=None):
    """A supported model with random weights (``name``: one of TINY or PRESETS), in eval mode.

    ``cfg``: a (modified) config to build instead of ``config(name)``, e.g. fewer layers."""
    if name not in TINY + PRESETS:
        raise KeyError(f"unknown model {name!r}; choose from {TINY + PRESETS}")
    cfg = config(name) if cfg is None else cfg
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MODEL_CLASSES[cfg.model_type](cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.pad_token_id = 0
    return model.eval()


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _family(model) -> str:
    mt = model.config.model_type
    return "qwen" if mt.startswith("qwen") and mt.endswith("_vl") else mt


def _llava_image(model, hw, g):
    vc = model.config.vision_config
    mt = model.config.model_type
    side = vc.image_size
    if mt == "llava":
        pv = torch.randn(1, 3, side, side, generator=g)
        extra = {}
        feats = model.model.get_image_features(pixel_values=_dev(model, pv)).pooler_output
    else:
        h, w = hw or (side, 2 * side)
        pinpoints = model.config.image_grid_pinpoints
        from transformers.image_processing_utils import select_best_resolution

        bh, bw = select_best_resolution((h, w), pinpoints)
        n_patch = 1 + (bh // side) * (bw // side)
        pv = torch.randn(1, n_patch, 3, side, side, generator=g)
        sizes = torch.tensor([[h, w]])
        extra = {"image_sizes": sizes}
        feats = model.model.get_image_features(pixel_values=_dev(model, pv),
                                               image_sizes=sizes.to(model.device)).pooler_output
    n = sum(int(f.shape[0]) if f.dim() == 2 else int(f.shape[0] * f.shape[1]) for f in feats)
    return pv, extra, n


def _forward_appends_video_newline(model) -> bool:
    import inspect

    src = inspect.getsource(type(model.model).forward)
    return "torch.cat((video_features, image_newline)" in src


def _dev(model, t):
    return t.to(model.device, model.dtype)


def _qwen_grid(model, t, h, w, g):
    vc = model.config.vision_config
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pv = torch.randn(t * h * w, dim, generator=g)
    n = t * h * w // vc.spatial_merge_size ** 2
    return pv, torch.tensor([[t, h, w]]), n


def make_inputs(model, prompts, padding_side: str = "left", seed: int = 0):
    """A padded batch from segment lists (see the module docstring). Returns a dict for
    ``model(**inputs)`` / ``model.generate(**inputs)``."""
    g = torch.Generator().manual_seed(seed)
    fam = _family(model)
    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    specials = [getattr(cfg, a, None) for a in ("image_token_id", "video_token_id",
                                                 "vision_start_token_id", "vision_end_token_id")]
    hi = min([vocab - 16] + [t for t in specials if isinstance(t, int) and t > 16])
    rows, types = [], []
    pix, sizes, vids, vid_sizes, img_thw, vid_thw = [], [], [], [], [], []
    dev = model.device
    for prompt in prompts:
        ids, tt = [], []
        for seg in prompt:
            if isinstance(seg, int):
                ids += torch.randint(16, hi, (seg,), generator=g).tolist()
                tt += [0] * seg
                continue
            kind, arg = (seg, None) if isinstance(seg, str) else seg
            if fam == "qwen":
                if kind == "image":
                    h, w = arg or (8, 12)
                    pv, thw, n = _qwen_grid(model, 1, h, w, g)
                    pix.append(pv); img_thw.append(thw)
                    tok, typ = cfg.image_token_id, 1
                else:
                    frames = arg or 4
                    pv, thw, n = _qwen_grid(model, frames // 2, 8, 8, g)
                    vids.append(pv); vid_thw.append(thw)
                    tok, typ = cfg.video_token_id, 2
                if kind == "video" and cfg.model_type == "qwen3_vl":
                    # Qwen3-VL: "<timestamp><vision_start>frame<vision_end>" per temporal patch
                    t = int(thw[0, 0])
                    for _ in range(t):
                        ts = torch.randint(16, hi, (2,), generator=g).tolist()
                        ids += ts + [cfg.vision_start_token_id] + [tok] * (n // t) + [
                            cfg.vision_end_token_id]
                        tt += [0, 0, 0] + [typ] * (n // t) + [0]
                    continue
                ids += [cfg.vision_start_token_id] + [tok] * n + [cfg.vision_end_token_id]
                tt += [0] + [typ] * n + [0]
            elif kind == "image":
                with torch.no_grad():
                    pv, extra, n = _llava_image(model, arg, g)
                pix.append(pv)
                if "image_sizes" in extra:
                    sizes.append(extra["image_sizes"])
                ids += [cfg.image_token_id] * n
                tt += [1] * n
            else:
                if model.config.model_type != "llava_onevision":
                    raise ValueError(f"video segments are not supported for {model.config.model_type}")
                frames = arg or 2
                side = cfg.vision_config.image_size
                pv = torch.randn(1, frames, 3, side, side, generator=g)
                with torch.no_grad():
                    feats = model.model.get_video_features(_dev(model, pv)).pooler_output  # positional: renamed across versions
                n = sum(int(f.numel() // f.shape[-1]) for f in feats)
                if _forward_appends_video_newline(model):  # e.g. transformers 5.17
                    n += len(feats)
                vids.append(pv)
                ids += [cfg.video_token_id] * n
                tt += [2] * n
        rows.append(ids)
        types.append(tt)
    N = max(len(r) for r in rows)
    B = len(rows)
    input_ids = torch.zeros(B, N, dtype=torch.long)
    mask = torch.zeros(B, N, dtype=torch.long)
    mm = torch.zeros(B, N, dtype=torch.int32)
    for b, (r, t) in enumerate(zip(rows, types)):
        sl = slice(N - len(r), N) if padding_side == "left" else slice(0, len(r))
        input_ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
        mm[b, sl] = torch.tensor(t, dtype=torch.int32)
    out = {"input_ids": input_ids, "attention_mask": mask}
    if fam == "qwen":
        out["mm_token_type_ids"] = mm
        if pix:
            out["pixel_values"] = torch.cat(pix)
            out["image_grid_thw"] = torch.cat(img_thw)
        if vids:
            out["pixel_values_videos"] = torch.cat(vids)
            out["video_grid_thw"] = torch.cat(vid_thw)
    else:
        if pix:
            if model.config.model_type == "llava":
                out["pixel_values"] = torch.cat(pix)
            else:  # pad the patch dimension
                P = max(p.shape[1] for p in pix)
                out["pixel_values"] = torch.cat(
                    [torch.cat([p, p.new_zeros(1, P - p.shape[1], *p.shape[2:])], 1) for p in pix])
                out["image_sizes"] = torch.cat(sizes)
        if vids:
            out["pixel_values_videos"] = torch.cat(vids)
    dt = model.dtype
    return {k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) for k, v in out.items()}
