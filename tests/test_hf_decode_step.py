"""The model layer's decode step: one decode_evict_layers_ call per generated token for all layers
(queries captured in the attention function, eviction after the last layer attended), equal to
the per-layer path (decode_evict_ per layer) in greedy tokens and kept positions."""

import types

import pytest
import torch

import tgvkv
from tgvkv import ops as tops

tiny = pytest.importorskip("tgvkv.testing")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared, loaded 2-core machine: one thread is 10x faster than two (no
    OpenMP barrier stalls) and the results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Counting(types.SimpleNamespace):
    """An ops module that counts the decode op calls (and forwards everything to tgvkv.ops)."""

    def __getattr__(self, name):
        return getattr(tops, name)


def _counting_ops():
    calls = {"decode_evict_layers_": 0, "decode_evict_": 0}

    def layers_(*a, **k):
        calls["decode_evict_layers_"] += 1
        return tops.decode_evict_layers_(*a, **k)

    def per_layer(*a, **k):
        calls["decode_evict_"] += 1
        return tops.decode_evict_(*a, **k)

    return _Counting(decode_evict_layers_=layers_, decode_evict_=per_layer), calls


class PerLayer(tgvkv.TGVKV):
    """TGV-KV with decode_step overridden: the model layer falls back to one decode_evict_ per
    layer (what the wiring did before the fused op)."""

    def decode_step(self, layer_idx, k, v, pos, length, q, n_seen, keep_fraction, n_protected,
                    scale):
        return self.ops.decode_evict_(k, v, pos, length, q, n_seen, keep_fraction, n_protected,
                                      float(scale), self.n_sink)


def _generate(model, inputs, policy, new_tokens):
    with tgvkv.apply(model, policy) as h, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
        cache = h.last_cache
    B = inputs["input_ids"].shape[0]
    kept = [[cache.kept_positions(l, b) for b in range(B)] for l in range(len(cache.layers))]
    return out, kept, cache


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_fused_decode_step_equals_per_layer_path(name):
    model = tiny.build(name)
    inputs = tiny.make_inputs(model, [[8, "image", 20], [5, "image", 14]], seed=1)
    new = 12
    ops_f, calls_f = _counting_ops()
    out_f, kept_f, cache = _generate(model, inputs, tgvkv.TGVKV(keep_ratio=0.1, ops=ops_f), new)
    ops_p, calls_p = _counting_ops()
    out_p, kept_p, _ = _generate(model, inputs, PerLayer(keep_ratio=0.1, ops=ops_p), new)
    assert torch.equal(out_f, out_p)
    assert kept_f == kept_p
    L = len(cache.layers)
    # one fused call per decode step (the first token comes from the prefill), none per layer
    assert calls_f == {"decode_evict_layers_": new - 1, "decode_evict_": 0}
    assert calls_p == {"decode_evict_layers_": 0, "decode_evict_": L * (new - 1)}
    # decode-time eviction happened: every layer holds fewer slots than prompt kept + generated
    n_kept = cache.result[1]
    assert all(len(kept_f[l][b]) < int(n_kept[l, b]) + new - 1
               for l in range(L) for b in range(2))
    # the [L, B] state is the layers' own memory (rows are views, updated in place)
    for l, layer in enumerate(cache.layers):
        assert layer.length.data_ptr() == cache.length[l].data_ptr()
        assert layer.n_protected.data_ptr() == cache.n_protected[l].data_ptr()


def test_decode_bookkeeping_allocates_no_per_step_buffers():
    """The mask buffer of a layer is allocated with its capacity, not per step: over decode steps
    that do not grow the capacity, its storage (and the K/V storage) stays the same, and the
    append runs as the fused op decode_append_ of the policy's ops."""
    model = tiny.build("tiny-llava")
    inputs = tiny.make_inputs(model, [[8, "image", 20]], seed=2)
    with tgvkv.apply(model, tgvkv.TGVKV(keep_ratio=0.2)) as h, torch.no_grad():
        cache = h.new_cache()
        kw = tgvkv.hf.cache_kwargs(model, cache)
        out = model(**inputs, **kw, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(tok)], 1)
        model(input_ids=tok, attention_mask=mask, **kw, use_cache=True)
        layer = cache.layers[0]
        assert layer._append is tgvkv.ops.decode_append_
        ptrs = (layer._mask_buf.data_ptr(), layer.keys.data_ptr())
        for _ in range(3):
            if layer.bound + 1 > layer.keys.shape[2]:
                break
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            model(input_ids=tok, attention_mask=mask, **kw, use_cache=True)
            assert (layer._mask_buf.data_ptr(), layer.keys.data_ptr()) == ptrs
            # the mask this step attended with: the live prefix before this step's eviction
            # (None: all `bound` slots of every sample, what the CPU cache passes when the
            # samples have equal lengths: always at batch 1)
            m = (layer.mask[:, 0, 0] if layer.mask is not None else
                 torch.ones(layer.length.shape[0], layer.bound, dtype=torch.bool))
            n = m.sum(1)
            assert torch.equal(m, torch.arange(m.shape[1])[None] < n[:, None])
            assert ((n - layer.length) >= 0).all() and ((n - layer.length) <= 1).all()


@pytest.mark.parametrize("prompts", [[[8, "image", 20]], [[8, "image", 20], [8, "image", 14]]],
                         ids=["batch1", "batch2-ragged"])
def test_cpu_decode_attends_over_exactly_the_live_slots(prompts):
    """On CPU the lengths are read each step (no device sync to avoid): a layer attends over the
    longest sample's live slots exactly, without a mask when every sample has that many (always
    at batch 1), with the live-slot mask otherwise; the greedy tokens match the masked oracle
    (tests/test_hf_models.py) either way, this checks the bookkeeping."""
    model = tiny.build("tiny-llava")
    inputs = tiny.make_inputs(model, prompts, seed=3)
    with tgvkv.apply(model, tgvkv.TGVKV(keep_ratio=0.2)) as h, torch.no_grad():
        cache = h.new_cache()
        kw = tgvkv.hf.cache_kwargs(model, cache)
        out = model(**inputs, **kw, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        mask = inputs["attention_mask"]
        masked_steps = 0
        for _ in range(20):  # past the fraction: decode evictions run and shrink the lengths
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            out = model(input_ids=tok, attention_mask=mask, **kw, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            for layer in cache.layers:
                # what this step attended with: the lengths before its decode eviction
                n = (layer.mask[:, 0, 0].sum(1) if layer.mask is not None
                     else torch.full_like(layer.length, layer.bound))
                assert int(n.max()) == layer.bound
                assert ((n - layer.length) >= 0).all() and ((n - layer.length) <= 1).all()
                if layer.mask is None:
                    assert (n == layer.bound).all()
                else:
                    masked_steps += 1
                    m = layer.mask[:, 0, 0]
                    assert torch.equal(m, torch.arange(layer.bound)[None] < n[:, None])
        assert (masked_steps == 0) == (len(prompts) == 1)
