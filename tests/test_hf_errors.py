"""Bad input and degenerate cases of the Hugging Face layer (SPEC §5)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# one xdist worker runs this module (its module/session fixture is built once)
pytestmark = pytest.mark.xdist_group("hf_errors")


pytest.importorskip("transformers")

import tgvkv.hf as hf  # noqa: E402
from tgvkv import testing as tiny  # noqa: E402
from tgvkv.policy import TGVKV, Policy  # noqa: E402

GEN = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def llava():
    return tiny.build("tiny-llava")


@pytest.mark.parametrize("kr", [0, 0.0, -0.1, 1.5, float("nan"), "0.5", None, True])
def test_bad_keep_ratio(kr):
    with pytest.raises(ValueError, match="keep_ratio"):
        TGVKV(keep_ratio=kr)


def test_bad_options():
    with pytest.raises(ValueError, match="budget"):
        TGVKV(budget="entropy")
    assert TGVKV().text_score == "all_queries"  # the fused default now (SPEC §1.3)
    assert TGVKV(text_score="guidance").text_score == "guidance"
    with pytest.raises(ValueError, match="text_score"):
        TGVKV(text_score="rows")
    with pytest.raises(ValueError, match="n_sink"):
        TGVKV(n_sink=-1)
    with pytest.raises(NotImplementedError, match="no_vision"):
        TGVKV(no_vision="uniform")
    with pytest.raises(TypeError, match="tgvkv.Policy"):
        hf.patch(tiny.build("tiny-llama"), {"keep_ratio": 0.1})
    assert TGVKV().keep_ratio == 0.05 and TGVKV().budget == "mass"


def test_vlm_config_without_image_token_id():
    m = tiny.build("tiny-qwen2-vl")
    # strict config dataclasses refuse None: bypass them, as a custom config lacking the ids would
    m.config.__dict__["image_token_id"] = None
    m.config.__dict__["video_token_id"] = None
    with pytest.raises(ValueError, match="image/video token id"):
        hf.patch(m, TGVKV(keep_ratio=0.1))


def test_unsupported_model_lists_supported():
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    m = tf.GPT2LMHeadModel(cfg)
    with pytest.raises(hf.UnsupportedModelError, match="Supported: LLaVA-1.5"):
        hf.patch(m, TGVKV(keep_ratio=0.1))


def test_patch_is_removed_cleanly(llava):
    impl = llava.config.get_text_config()._attn_implementation
    with hf.apply(llava, TGVKV(keep_ratio=0.2)):
        assert llava.config.get_text_config()._attn_implementation.startswith("tgvkv|")
        with pytest.raises(RuntimeError, match="already patched"):
            hf.patch(llava, TGVKV(keep_ratio=0.2))
    assert llava.config.get_text_config()._attn_implementation == impl
    assert "generate" not in llava.__dict__
    assert llava.config.vision_config._attn_implementation == impl  # vision tower untouched


def _same_as_unpatched(m, inp, policy):
    ref = m.generate(**inp, **GEN, output_scores=True, return_dict_in_generate=True)
    with hf.apply(m, policy) as h:
        out = m.generate(**inp, **GEN, output_scores=True, return_dict_in_generate=True)
        cache = h.last_cache
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.scores, out.scores))
    return cache


def test_prompt_without_guidance_text_is_not_evicted(llava):
    # the prompt ends with the image: nothing grounds the ranking (SPEC §5) -> full cache
    inp = tiny.make_inputs(llava, [[6, "image"]])
    cache = _same_as_unpatched(llava, inp, TGVKV(keep_ratio=0.1))
    assert cache.passthrough and cache.result is None


def test_prompt_without_vision_is_not_evicted(llava):
    inp = tiny.make_inputs(llava, [[40]])
    cache = _same_as_unpatched(llava, inp, TGVKV(keep_ratio=0.1))
    assert cache.passthrough


def test_text_llm_is_not_evicted():
    m = tiny.build("tiny-llama")
    inp = tiny.make_inputs(m, [[30], [12]])
    cache = _same_as_unpatched(m, inp, TGVKV(keep_ratio=0.1))
    assert cache.passthrough


def test_short_prompt_is_not_evicted(llava):
    # N <= n_sink + 1 with a vision token: nothing to evict
    inp = {"input_ids": torch.tensor([[5, 7]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    ids = torch.tensor([[5, llava.config.image_token_id, 9]])
    cache = llava_cache(llava, TGVKV(keep_ratio=0.1, n_sink=4), ids)
    assert cache.passthrough
    del inp


def llava_cache(m, policy, ids):
    h = hf.patch(m, policy)
    try:
        c = h.new_cache()
        c.begin_prefill(ids, None)
    finally:
        h.remove()
    return c


def test_mixed_batch_evicts_only_grounded_samples(llava):
    inp = tiny.make_inputs(llava, [[4, "image", 6], [30], [3, "image"]])
    with hf.apply(llava, TGVKV(keep_ratio=0.2)) as h:
        llava.generate(**inp, **GEN)
        cache = h.last_cache
    n_real = inp["attention_mask"].sum(1)
    n_kept = cache.result[1]
    assert (n_kept[:, 0] < n_real[0]).all()  # grounded sample: evicted
    assert (n_kept[:, 1] == n_real[1]).all() and (n_kept[:, 2] == n_real[2]).all()


def test_inputs_embeds_only_is_a_clear_error(llava):
    inp = tiny.make_inputs(llava, [[4, "image", 6]])
    emb = llava.get_input_embeddings()(inp["input_ids"])
    with hf.apply(llava, TGVKV(keep_ratio=0.2)) as h:
        with pytest.raises(ValueError, match="input_ids"):
            llava(inputs_embeds=emb, **hf.cache_kwargs(llava, h.new_cache()), use_cache=True)


def test_custom_policy_plugs_in(llava):
    class Random(Policy):
        def layer_scores(self, layer_idx, q, k, q_pos, modality, scale):
            g = torch.Generator().manual_seed(layer_idx)
            B, N = modality.shape
            return torch.rand(B, N, generator=g), torch.ones(B, 2)

    inp = tiny.make_inputs(llava, [[4, "image", 6]])
    with hf.apply(llava, Random(keep_ratio=0.25)) as h:
        out = llava.generate(**inp, **GEN)
        cache = h.last_cache
    assert out.shape[1] == inp["input_ids"].shape[1] + GEN["max_new_tokens"]
    N = inp["input_ids"].shape[1]
    assert (cache.result[1] < N).all()


def test_cache_outside_patched_model_is_a_clear_error(llava):
    inp = tiny.make_inputs(llava, [[4, "image", 6]])
    with hf.apply(llava, TGVKV(keep_ratio=0.2)) as h:
        cache = h.new_cache()
    with pytest.raises(RuntimeError, match="patched"):
        llava(**inp, **hf.cache_kwargs(llava, cache), use_cache=True)


def test_foreign_cache_in_patched_model_is_a_clear_error(llava):
    # a cache tgvkv cannot evict must not silently run the full cache
    from transformers import DynamicCache

    inp = tiny.make_inputs(llava, [[4, "image", 6]])
    with hf.apply(llava, TGVKV(keep_ratio=0.2)):
        with pytest.raises(TypeError, match="not a TGVKVCache"):
            llava(**inp, **hf.cache_kwargs(llava, DynamicCache(config=llava.config)), use_cache=True)
    with torch.no_grad():  # unpatched again: a DynamicCache is fine
        llava(**inp, **hf.cache_kwargs(llava, DynamicCache(config=llava.config)), use_cache=True)


def test_cache_under_both_names_is_a_clear_error(llava):
    # `cache=` (transformers >= 5.24) and `past_key_values=` at once: which one would be evicted?
    inp = tiny.make_inputs(llava, [[4, "image", 6]])
    with hf.apply(llava, TGVKV(keep_ratio=0.2)) as h:
        with pytest.raises(ValueError, match="not both"):
            llava(**inp, cache=h.new_cache(), past_key_values=h.new_cache(), use_cache=True)
        with pytest.raises(ValueError, match="not both"):
            llava.generate(**inp, cache=h.new_cache(), past_key_values=h.new_cache(), **GEN)
        # the installed version's name alone, the other one None, is the cache
        cache = h.new_cache()
        other = "past_key_values" if hf.cache_arg_name(llava) == "cache" else "cache"
        llava(**inp, **hf.cache_kwargs(llava, cache), **{other: None}, use_cache=True)
        assert cache.phase == "done" and cache.result is not None


@pytest.mark.parametrize("how", ["prompt_lookup", "assistant_model", "generation_config",
                                 "model_default"])
def test_assisted_decoding_is_a_clear_error(llava, how):
    # assisted decoding crops the cache after each draft; an evicted cache cannot be cropped
    from transformers import GenerationConfig

    inp = tiny.make_inputs(llava, [[6, "image", 9]])
    kw = dict(GEN)
    saved = llava.generation_config
    if how == "prompt_lookup":
        kw["prompt_lookup_num_tokens"] = 3
    elif how == "assistant_model":
        kw["assistant_model"] = llava
    elif how == "generation_config":
        kw["generation_config"] = GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=4)
    else:
        llava.generation_config = GenerationConfig(prompt_lookup_num_tokens=2)
    try:
        with hf.apply(llava, TGVKV(keep_ratio=0.3)):
            with pytest.raises(ValueError, match=r"tgvkv: generate\(.*\) is assisted"):
                llava.generate(**inp, **kw)
            # nothing was left behind: the next, plain call works under the same handle
            llava.generation_config = saved
            kw = {k: v for k, v in kw.items() if k in GEN}
            assert llava.generate(**inp, **kw).shape[1] == inp["input_ids"].shape[1] + 4
    finally:
        llava.generation_config = saved
    # unpatched, transformers' own assisted decoding still runs
    out = llava.generate(**inp, max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=2)
    assert out.shape[1] == inp["input_ids"].shape[1] + 4


@pytest.mark.parametrize("where", ["argument", "generation_config"])
def test_cache_implementation_is_a_clear_error(llava, where):
    # transformers would build a cache of its own next to the TGVKVCache tgvkv passes, and its
    # error would blame a cache the caller never passed
    from transformers import GenerationConfig

    inp = tiny.make_inputs(llava, [[6, "image", 9]])
    kw = dict(GEN)
    if where == "argument":
        kw["cache_implementation"] = "static"
    else:
        kw["generation_config"] = GenerationConfig(cache_implementation="static", max_new_tokens=4)
    with hf.apply(llava, TGVKV(keep_ratio=0.3)):
        with pytest.raises(ValueError, match=r"tgvkv: generate\(cache_implementation='static'\)"):
            llava.generate(**inp, **kw)
    out = llava.generate(**inp, **kw)  # unpatched: transformers' static cache runs
    assert out.shape[1] == inp["input_ids"].shape[1] + 4
