"""Plugging a policy into a Hugging Face model: ``tgvkv.apply`` / ``tgvkv.patch``.

What patching does (and undoes on ``remove()``), all on the model *instance*, no installed file is
touched:

- registers an attention function ``tgvkv|<base>`` (``<base>`` = the model's own ``sdpa`` or
  ``flash_attention_*``) in transformers' ``AttentionInterface`` (and the same mask function as the
  base in ``AttentionMaskInterface``) and sets it as the ``_attn_implementation`` of the language
  model's config only (the vision tower keeps its own);
- tags the language model's attention modules with a runtime object (the active cache);
- adds a forward pre-hook / hook on the top-level model: the pre-hook reads ``input_ids`` and
  ``attention_mask`` of a prefill (modality map, guidance rows), the hook runs the eviction once the
  prefill forward is done;
- wraps ``model.generate`` so that it uses a fresh :class:`~tgvkv.hf.cache.TGVKVCache` unless the
  caller passes one (as ``cache=``, transformers >= 5.24, or ``past_key_values=``, the older name);
  any other cache is refused at once with a ``TypeError`` (it would not be evicted).

Concurrency: the active cache is per thread (each ``generate()`` call routes its layers to its own
cache), so one patched model may serve several threads at once; the policy itself is stateless.

The attention function: without an active TGV-KV cache (or in passthrough) it calls the base
function unchanged. During prefill it calls the base function, then the policy's
``layer_scores`` on the post-RoPE queries/keys it was given. After compaction (decode) it attends
with SDPA and the cache's own per-layer mask and hands the step's query to the cache; after the
last layer the cache calls the policy's ``decode_step_layers`` once for all layers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import warnings
import weakref

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..policy import Policy
from .cache import TGVKVCache
from .modality import vision_token_ids

VLM_MODEL_TYPES = {
    "llava": "LLaVA-1.5 (LlavaForConditionalGeneration)",
    "llava_next": "LLaVA-NeXT (LlavaNextForConditionalGeneration)",
    "llava_onevision": "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)",
    "qwen2_vl": "Qwen2-VL (Qwen2VLForConditionalGeneration)",
    "qwen2_5_vl": "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)",
    "qwen3_vl": "Qwen3-VL (Qwen3VLForConditionalGeneration)",
}
TEXT_MODEL_TYPES = {
    "llama": "Llama (LlamaForCausalLM)",
    "mistral": "Mistral (MistralForCausalLM)",
    "qwen2": "Qwen2 (Qwen2ForCausalLM)",
    "qwen3": "Qwen3 (Qwen3ForCausalLM)",
}
BASE_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "eager")
PREFIX = "tgvkv|"
# Tested with transformers 5.17 (the oldest supported: the GPU machine's) and 5.25.0 (the newest
# release; 5.24 renamed ``past_key_values`` to ``cache``); keep in step with setup.py and the README
# (tests/test_layout.py checks); CI reads the oldest from setup.py.
TRANSFORMERS_MIN, TRANSFORMERS_MAX = "5.17", "5.25.0"
TRANSFORMERS_RANGE = f">={TRANSFORMERS_MIN},<={TRANSFORMERS_MAX}"
CACHE_ARGS = ("cache", "past_key_values")  # the cache argument's names, newest first


def _check_transformers_version():
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    if v < Version("5.0"):
        raise ImportError(f"tgvkv.hf needs transformers {TRANSFORMERS_RANGE} (found "
                          f"{transformers.__version__}: the Cache-layer API differs before 5.0)")
    if not (Version(TRANSFORMERS_MIN) <= v <= Version(TRANSFORMERS_MAX)):
        warnings.warn(f"tgvkv.hf is tested with transformers {TRANSFORMERS_RANGE}; found "
                      f"{transformers.__version__}", stacklevel=3)


class UnsupportedModelError(ValueError):
    pass


def cache_arg_name(model) -> str:
    """The name under which ``model``'s forward/generate take the KV cache: ``"cache"``
    (transformers >= 5.24) or ``"past_key_values"`` (older releases)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``model(**inputs, **cache_kwargs(model, cache))``: the cache under the name this
    transformers release expects (see :func:`cache_arg_name`)."""
    return {cache_arg_name(model): cache}


def output_cache(output):
    """The cache a forward/generate output carries (``.cache`` on transformers >= 5.24,
    ``.past_key_values`` before), or None."""
    for n in CACHE_ARGS:
        if n in output.keys():
            return output[n]
    return None


def _given_cache(kwargs: dict):
    """The cache a caller passed under either name (None when none was given)."""
    new, old = kwargs.get(CACHE_ARGS[0]), kwargs.get(CACHE_ARGS[1])  # no loop: runs every step
    if new is not None and old is not None:
        raise ValueError("tgvkv: pass the cache once, as `cache=` or `past_key_values=`, not both")
    return old if new is None else new


def _refuse_foreign(cache) -> None:
    """Never a silent fallback to the full cache: a cache that is not ours would not be evicted."""
    if cache is not None and not isinstance(cache, TGVKVCache):
        raise TypeError(f"tgvkv: the cache passed is a {type(cache).__name__}, not a TGVKVCache, "
                        "so this call could not evict: let generate() make the cache, pass "
                        "handle.new_cache(), or handle.remove() to run unpatched")


def supported_models() -> str:
    rows = list(VLM_MODEL_TYPES.values()) + [v + " (text only: no eviction by default)"
                                             for v in TEXT_MODEL_TYPES.values()]
    return "; ".join(rows)


# --------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------
def _make_attention(base_name: str):
    def tgvkv_attention(module, query, key, value, attention_mask, **kwargs):
        base = (ALL_ATTENTION_FUNCTIONS[base_name] if base_name != "eager"
                else _eager_forward(module))
        rt = getattr(module, "_tgvkv_runtime", None)
        cache = rt.cache if rt is not None else None
        if cache is None or cache.passthrough:
            return base(module, query, key, value, attention_mask, **kwargs)
        layer_idx = module.layer_idx
        layer = cache.layers[layer_idx]
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        if layer.compacted:
            if query.shape[2] != 1:
                raise NotImplementedError("tgvkv: one query token per decode step after eviction")
            out = _decode_attention(module, query, key, value, layer.mask, scaling, kwargs)
            # the eviction of this step runs once for all layers, after the last one attended
            cache.capture_query(layer_idx, query.select(2, -1), scaling)
            return out
        out = base(module, query, key, value, attention_mask, **kwargs)
        if cache.phase == "prefill":
            if key.shape[2] != cache.modality.shape[1]:
                raise RuntimeError(
                    f"tgvkv: layer {layer_idx} keys cover {key.shape[2]} slots but the prompt has "
                    f"{cache.modality.shape[1]}; chunked prefill is not supported")
            scores, stats = cache.policy.layer_scores(layer_idx, query, key, cache.q_pos,
                                                      cache.modality, scaling)
            cache.record_layer(layer_idx, scores, stats)
        return out

    tgvkv_attention.__name__ = f"tgvkv_attention_{base_name}"
    return tgvkv_attention


def _decode_attention(module, query, key, value, mask, scaling, kwargs):
    """Attention of a decode step over a compacted cache: SDPA with the live-slot mask [B, 1, 1, S]
    (None: every one of the S slots is live in every sample; the CPU cache passes None then).

    On CPU, SDPA is called with ``enable_gqa`` and the mask: transformers' sdpa_attention_forward
    uses GQA only without a mask and otherwise repeats K/V to all query heads every step, which
    measured 28x slower per layer on CPU at LLaVA-NeXT-7B shapes (32 query / 8 KV heads, 300
    slots: 9.4 ms vs 0.33 ms, torch 2.13). Elsewhere (CUDA: masked GQA would fall back to the math
    kernel) transformers' function runs as is. Returns ``(out [B, q_len, Hq, D], None)`` like it."""
    if query.device.type != "cpu":
        kw = {k: v for k, v in kwargs.items() if k not in ("sliding_window", "s_aux")}
        return sdpa_attention_forward(module, query, key, value, mask, **kw)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=float(kwargs.get("dropout", 0.0) or 0.0),
        scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _eager_forward(module):
    import sys

    mod = sys.modules[type(module).__module__]
    return mod.eager_attention_forward


def _register(base_name: str) -> str:
    name = PREFIX + base_name
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _make_attention(base_name))
        mask_base = "sdpa" if base_name not in AttentionMaskInterface._global_mapping else base_name
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[mask_base])
    return name


# --------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------
class _Runtime:
    """What the patched attention modules share: the policy and, **per thread**, the cache of the
    forward call running in that thread (so concurrent generate() calls do not mix caches)."""

    def __init__(self, policy: Policy, num_layers: int, vision_ids):
        self.policy = policy
        self.num_layers = num_layers
        self.vision_ids = vision_ids
        self._local = threading.local()
        self.last: TGVKVCache | None = None  # the cache of the latest prefill, any thread

    @property
    def cache(self) -> TGVKVCache | None:
        return getattr(self._local, "cache", None)

    @cache.setter
    def cache(self, value: TGVKVCache | None) -> None:
        self._local.cache = value

    def new_cache(self) -> TGVKVCache:
        return TGVKVCache(self.num_layers, self.policy, self.vision_ids, runtime=self)


def _language_model(model):
    inner = getattr(model, "model", None)
    if inner is None:
        raise UnsupportedModelError(f"tgvkv: {type(model).__name__} has no .model; supported: "
                                    f"{supported_models()}")
    return getattr(inner, "language_model", None) or inner


def _check_supported(model):
    mt = getattr(model.config, "model_type", None)
    if mt in VLM_MODEL_TYPES:
        ids = vision_token_ids(model.config)
        if not ids:
            raise ValueError(f"tgvkv: the {mt} config has no image/video token id (looked for "
                             "image_token_id, image_token_index, video_token_id, video_token_index)"
                             "; the modality map cannot be built")
        return ids
    if mt in TEXT_MODEL_TYPES:
        return vision_token_ids(model.config)
    raise UnsupportedModelError(f"tgvkv: model type {mt!r} ({type(model).__name__}) is not "
                                f"supported. Supported: {supported_models()}")


class Handle:
    """A patched model; ``remove()`` restores it. Also a context manager."""

    def __init__(self, model, policy: Policy):
        if not isinstance(policy, Policy):
            raise TypeError(f"tgvkv: policy must be a tgvkv.Policy (e.g. tgvkv.TGVKV(...)), got "
                            f"{type(policy).__name__}")
        _check_transformers_version()
        if getattr(model, "_tgvkv_handle", None) is not None:
            raise RuntimeError("tgvkv: this model is already patched; remove() the first handle")
        vision_ids = _check_supported(model)
        lm = _language_model(model)
        attn_modules = [m for m in lm.modules()
                        if hasattr(m, "layer_idx") and hasattr(m, "scaling") and hasattr(m, "config")]
        if not attn_modules:
            raise UnsupportedModelError(f"tgvkv: no attention modules found in {type(lm).__name__}")
        configs = {id(c): c for c in [lm.config] + [m.config for m in attn_modules]}
        for c in configs.values():
            impl = c._attn_implementation
            if impl is not None and impl.startswith(PREFIX):
                raise RuntimeError("tgvkv: the model's attention is already a tgvkv function")
            if impl not in BASE_ATTENTION:
                raise UnsupportedModelError(
                    f"tgvkv: attention implementation {impl!r} is not supported; use one of "
                    f"{BASE_ATTENTION[:-1]} (sdpa is the default)")
            layer_types = getattr(c, "layer_types", None) or []
            if any(t != "full_attention" for t in layer_types) or (
                    getattr(c, "sliding_window", None) is not None
                    and getattr(c, "use_sliding_window", True)
                    and getattr(c, "model_type", "") in ("mistral",)):
                raise UnsupportedModelError("tgvkv: sliding-window / non-full attention layers are "
                                            "not supported")
        num_layers = max(m.layer_idx for m in attn_modules) + 1
        self.model = model
        self.policy = policy
        self.runtime = _Runtime(policy, num_layers, vision_ids)
        self._configs = [(c, c._attn_implementation) for c in configs.values()]
        self._modules = attn_modules
        for c, impl in self._configs:
            c._attn_implementation = _register(impl)
        for m in attn_modules:
            m._tgvkv_runtime = self.runtime
        rt = self.runtime
        self._hooks = [
            model.register_forward_pre_hook(functools.partial(_pre_hook, rt), with_kwargs=True),
            model.register_forward_hook(functools.partial(_post_hook, rt), with_kwargs=True),
        ]
        self._had_generate = "generate" in model.__dict__
        self._orig_generate = model.generate
        model.generate = functools.partial(_generate, weakref.ref(rt), self._orig_generate,
                                           cache_arg_name(model))
        model._tgvkv_handle = self
        self.removed = False

    def new_cache(self) -> TGVKVCache:
        """A fresh cache for a direct ``model(..., cache=cache)`` call (``past_key_values=`` on
        transformers < 5.24; :func:`cache_arg_name` tells which)."""
        return self.runtime.new_cache()

    @property
    def last_cache(self) -> TGVKVCache | None:
        """The cache of the latest prefill run through this handle (in any thread)."""
        return self.runtime.last

    def summary(self):
        """:class:`~tgvkv.hf.cache.EvictionSummary` of the latest call (None before any)."""
        return None if self.runtime.last is None else self.runtime.last.summary()

    def remove(self) -> None:
        if self.removed:
            return
        for h in self._hooks:
            h.remove()
        for c, impl in self._configs:
            c._attn_implementation = impl
        for m in self._modules:
            if hasattr(m, "_tgvkv_runtime"):
                del m._tgvkv_runtime
        if self._had_generate:
            self.model.generate = self._orig_generate
        else:
            self.model.__dict__.pop("generate", None)
        self.model._tgvkv_handle = None
        self.runtime.cache = None
        self.removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def _pre_hook(rt: _Runtime, module, args, kwargs):
    cache = _given_cache(kwargs)
    if not isinstance(cache, TGVKVCache):
        rt.cache = None
        _refuse_foreign(cache)
        return None
    if cache.policy is not rt.policy:
        raise ValueError("tgvkv: this TGVKVCache was made for another policy/handle")
    rt.cache = cache
    if cache.phase == "empty":
        rt.last = cache
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        if input_ids is None:
            raise ValueError("tgvkv: the prefill call needs input_ids (the modality map is read "
                             "from the image/video placeholder ids); inputs_embeds alone is not "
                             "supported")
        am = kwargs.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() != 2:
            am = None if am.dim() != 2 else am
        cache.begin_prefill(input_ids, am)
    elif cache.phase == "prefill":
        cache.finalize()
    return None


def _post_hook(rt: _Runtime, module, args, kwargs, output):
    cache = rt.cache
    if cache is not None and cache.phase == "prefill":
        cache.finalize()
    return None


# generate() options that make it assisted / speculative decoding (GenerationConfig fields; the
# assistant model is an argument of generate only)
ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def _generation_config(orig_generate, kwargs):
    """The GenerationConfig a generate() call starts from: its argument, else the model's."""
    cfg = kwargs.get("generation_config")
    if cfg is None:
        cfg = getattr(getattr(orig_generate, "__self__", None), "generation_config", None)
    return cfg


def _option(kwargs, cfg, name):
    """A generate() option as the call sees it: its argument, else the generation config's."""
    return kwargs[name] if name in kwargs else getattr(cfg, name, None)


def _refuse_cache_implementation(kwargs, cfg):
    """generate(cache_implementation=...) asks transformers to build its own cache, next to the
    TGVKVCache tgvkv passes (transformers' error would blame a cache the caller never passed)."""
    value = _option(kwargs, cfg, "cache_implementation")
    if value is not None:
        raise ValueError(
            f"tgvkv: generate(cache_implementation={value!r}) asks transformers for a cache of its "
            "own, while tgvkv evicts in the TGVKVCache it passes to generate: drop the option "
            "(also from the generation config), or run outside tgvkv.apply / with the handle "
            "removed")


def _refuse_assisted(kwargs, cfg):
    """Assisted decoding verifies drafted tokens and rolls the cache back with ``crop()``; an
    evicted cache cannot be cropped (transformers' own error does not say why): say so first."""
    for name in ASSISTED:
        value = _option(kwargs, cfg, name)
        if value is not None and value is not False:
            raise ValueError(
                f"tgvkv: generate({name}=...) is assisted / speculative decoding, which rolls the "
                "KV cache back with crop() after each draft, and an evicted cache cannot be "
                "cropped: generate without it, or outside tgvkv.apply / with the handle removed")


def _generate(rt_ref, orig_generate, cache_arg, *args, **kwargs):
    rt = rt_ref()
    streamer = kwargs.get("streamer")
    try:
        given = _given_cache(kwargs)
        _refuse_foreign(given)  # before generate starts: a streamer must not wait for nothing
        if rt is not None:
            cfg = _generation_config(orig_generate, kwargs)
            _refuse_assisted(kwargs, cfg)
        if rt is not None and given is None:
            if kwargs.get("use_cache", True) is False:
                warnings.warn("tgvkv: generate(use_cache=False) keeps no KV cache, so nothing is "
                              "evicted: the call runs as unpatched", stacklevel=2)
            else:
                _refuse_cache_implementation(kwargs, cfg)
                for n in CACHE_ARGS:
                    kwargs.pop(n, None)
                kwargs[cache_arg] = rt.new_cache()
        return orig_generate(*args, **kwargs)
    except BaseException:
        # generate() in a thread feeding a streamer: end the stream so that the consumer stops
        # instead of waiting forever; the error itself propagates in the generating thread
        if streamer is not None and hasattr(streamer, "end"):
            with contextlib.suppress(Exception):
                streamer.end()
        raise


def patch(model, policy: Policy) -> Handle:
    """Patch ``model`` (persistent) with ``policy``; returns a handle with ``.remove()``.

    Parameters
    ----------
    model : a supported transformers model instance (see :func:`supported_models`).
    policy : a :class:`tgvkv.Policy`, e.g. ``tgvkv.TGVKV(keep_ratio=0.05)``.
    """
    return Handle(model, policy)


@contextlib.contextmanager
def apply(model, policy: Policy):
    """``with tgvkv.apply(model, policy): model.generate(...)``: patch for the block only."""
    handle = Handle(model, policy)
    try:
        yield handle
    finally:
        handle.remove()
