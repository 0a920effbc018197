"""Cross-check of the baselines in ``tgvkv.eval.baselines`` against kvpress (NVIDIA, PyPI).

Runs only when kvpress is importable (skipped otherwise). Tested with kvpress 0.5.5, torch 2.13.0
and transformers 5.23.0. kvpress 0.5.5 pins ``transformers<5.3`` while tgvkv needs
``>=5.17,<5.24``, so no setup.py extra can resolve; install it without its dependencies, plus the
ones ``import kvpress`` actually needs (everything else it pins is already there or unused here)::

    pip install --no-deps kvpress==0.5.5
    pip install "requests>=2.32.3,<3" "cachetools>=5.5.2,<6" "fire>=0.6.0,<0.7" \\
        "datasets>=2.21.0" "pandas>=2.2.2,<3"

Two shims, both local to this module:

- transformers 5.23's Llama no longer passes ``cache_position`` to its attention modules and
  kvpress's forward hook reads ``kwargs["cache_position"]`` (``KeyError: 'cache_position'``), so
  the kvpress runs pass ``cache_position=torch.arange(N)`` to the forward (it reaches the attention
  modules through ``**kwargs``).
- ``import kvpress`` wraps every function of transformers' ``ALL_ATTENTION_FUNCTIONS`` (fake keys
  for its head-wise presses, none of which is used here); the mapping is restored right after the
  import so the rest of a test session runs on unwrapped attention.

Our side runs through the real wiring (``tgvkv.apply``) on the same tiny random Llama. The shared
wiring only evicts a sample that has vision tokens and text after them, so the config gets an
``image_token_id`` and a block of the prompt is that token; the baselines rank text and vision in
one class, so the modality map does not change what they keep. kvpress has no sinks for SnapKV /
PyramidKV, so ours runs with ``n_sink=0`` there (the last prompt slot, always kept by our wiring, is
in the observation window anyway). Budgets are chosen with ``N * keep_ratio`` integral (see the
rounding difference below) and at least the window.

What matches (same kept positions, every layer and sample):

- StreamingLLM (``StreamingLLMPress``, same ``n_sink``): any number of KV heads.
- SnapKV (``SnapKVPress``, same window and kernel; average pooling over the slots before the
  window; the window always kept): with one KV head. kvpress keeps one set per KV head (scores
  averaged over the query heads of its group); our ops keep one set per layer, ranked by the
  scores averaged over all heads, which is kvpress's score averaged over KV heads; the GQA test
  checks exactly that (scores, and ours = top-k of the head-averaged kvpress scores).
- PyramidKV (``PyramidKVPress``, same beta): same per-layer budgets (including the cap of the bottom
  layer at ``N - window``) and positions, with one KV head; with GQA as for SnapKV.

Where and why we differ (each pinned by a test below):

- Budget rounding: kvpress keeps ``int(N * (1 - compression_ratio))`` (floor); our ops forget
  ``round((1 - keep_ratio) * N)`` (half to even), so ours may keep one more slot.
- PyramidKV on short prompts: kvpress falls back to uniform (SnapKV) budgets when the smallest
  layer budget would be below the window; ours keeps the pyramid (our prompts are all short, the
  fallback would make it SnapKV at most ratios).
- H2O vs ``ObservedAttentionPress``: same attention column sums, but kvpress divides each by the
  number of queries that see the slot and keeps no recent window; ours keeps the raw sums for half
  the budget and the most recent slots for the other half (the H2O paper). Only the scores are
  compared.
- Random: kvpress re-seeds its generator for every layer (every layer drops the same positions);
  ours draws once per layer from one generator and protects the sinks and the last slot. Same
  distribution, different draws: nothing position-wise to compare.
- Always kept by our wiring (all policies): the first ``n_sink`` slots and the last prompt slot.
"""

import pytest
import torch

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_saved_attention = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
kvpress = pytest.importorskip(
    "kvpress", reason="kvpress cannot be imported (not installed, or broken by this transformers); "
    "install: pip install --no-deps kvpress==0.5.5 plus its import-time deps, see this "
    "module's docstring", exc_type=ImportError)
ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
ALL_ATTENTION_FUNCTIONS._local_mapping.update(_saved_attention)

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import tgvkv  # noqa: E402
import tgvkv.hf as hf  # noqa: E402
from tgvkv.eval.baselines import policy_class  # noqa: E402

IMG = 3  # "image" placeholder id of the tiny Llama
N = 64  # prompt length
WINDOW, KERNEL = 8, 5


def _model(n_kv_heads, attn="sdpa", n_layers=4, seed=0):
    # initializer_range 0.3: peaked attention, so the top-k boundaries are far (>1e-4 relative)
    # above float noise between the two implementations
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=n_layers, num_attention_heads=4,
                      num_key_value_heads=n_kv_heads, max_position_embeddings=128,
                      initializer_range=0.3, attn_implementation=attn, image_token_id=IMG)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _prompt(seed=1, B=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(IMG + 1, 128, (B, N), generator=g)
    ids[:, 10:30] = IMG  # "vision" block, text after it
    return ids


def _kvpress_run(model, press, ids):
    """kvpress's kept positions [layer][sample][kv head] (sorted) and its scores per layer."""
    kept, scores = {}, {}
    compress, score = press.compress, getattr(press, "score", None)

    def rec_score(module, *args):
        out = score(module, *args)
        scores[module.layer_idx] = out.detach().clone()
        return out

    def rec_compress(module, hidden_states, keys, values, attentions, kwargs):
        out_k, out_v = compress(module, hidden_states, keys, values, attentions, kwargs)
        per_b = []
        for b in range(keys.shape[0]):
            per_h = []
            for h in range(keys.shape[1]):
                eq = (out_k[b, h][:, None, :] == keys[b, h][None, :, :]).all(-1)  # [kept, N]
                assert bool((eq.sum(1) == 1).all()), "a kept key matches no / several prompt keys"
                per_h.append(sorted(eq.float().argmax(1).tolist()))
            per_b.append(per_h)
        kept[module.layer_idx] = per_b
        return out_k, out_v

    press.compress = rec_compress
    if score is not None:
        press.score = rec_score
    with torch.no_grad(), press(model):
        model(ids, **hf.cache_kwargs(model, DynamicCache(config=model.config)),
              cache_position=torch.arange(ids.shape[1]))
    L = model.config.num_hidden_layers
    assert sorted(kept) == list(range(L))
    return [kept[l] for l in range(L)], scores


def _ours_run(model, policy, ids):
    """Our kept positions [layer][sample] (sorted, through tgvkv.apply) and our layer scores."""
    scores = {}
    layer_scores = policy.layer_scores

    def rec(layer_idx, *args):
        s, st = layer_scores(layer_idx, *args)
        scores[layer_idx] = s.detach().clone()
        return s, st

    policy.layer_scores = rec
    with torch.no_grad(), tgvkv.apply(model, policy) as h:
        cache = h.new_cache()
        model(ids, **hf.cache_kwargs(model, cache))
        assert cache.result is not None, "the wiring did not evict"
        kept = [[cache.kept_positions(l, b) for b in range(ids.shape[0])]
                for l in range(model.config.num_hidden_layers)]
    return kept, scores


def _assert_same(kv_kept, ours_kept):
    for l, (kv_l, ours_l) in enumerate(zip(kv_kept, ours_kept)):
        for b, (kv_b, ours_b) in enumerate(zip(kv_l, ours_l)):
            for h, kv_bh in enumerate(kv_b):
                assert kv_bh == ours_b, f"layer {l} sample {b} kv head {h}: kvpress {kv_bh} vs " \
                                        f"ours {ours_b}"


# ------------------------------------------------------------------------------------------------
# Same kept positions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
def test_streamingllm_same_positions(keep_ratio):
    model, ids = _model(n_kv_heads=2), _prompt()
    kv, _ = _kvpress_run(model, kvpress.StreamingLLMPress(compression_ratio=1 - keep_ratio,
                                                          n_sink=4), ids)
    ours, _ = _ours_run(model, policy_class("streamingllm")(keep_ratio=keep_ratio, n_sink=4), ids)
    assert len(ours[0][0]) == int(N * keep_ratio)
    _assert_same(kv, ours)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # kvpress: recomputed vs observed attention
@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
def test_snapkv_same_positions_one_kv_head(attn, keep_ratio):
    model, ids = _model(n_kv_heads=1, attn=attn), _prompt()
    kv, _ = _kvpress_run(model, kvpress.SnapKVPress(compression_ratio=1 - keep_ratio,
                                                    window_size=WINDOW, kernel_size=KERNEL), ids)
    policy = policy_class("snapkv")(keep_ratio=keep_ratio, n_sink=0, window=WINDOW, kernel=KERNEL)
    ours, _ = _ours_run(model, policy, ids)
    _assert_same(kv, ours)


def test_snapkv_gqa_ours_is_kvpress_averaged_over_kv_heads():
    """kvpress keeps one set per KV head; ours one per layer from the all-head average, which is
    kvpress's per-KV-head score averaged over KV heads (ours sums the window rows, kvpress
    averages them: a factor ``window``)."""
    model, ids = _model(n_kv_heads=2), _prompt()
    kv, kv_scores = _kvpress_run(model, kvpress.SnapKVPress(
        compression_ratio=0.5, window_size=WINDOW, kernel_size=KERNEL), ids)
    policy = policy_class("snapkv")(keep_ratio=0.5, n_sink=0, window=WINDOW, kernel=KERNEL)
    ours, our_scores = _ours_run(model, policy, ids)
    heads_differ = False
    for l in range(len(kv)):
        avg = kv_scores[l].mean(1)  # [B, N]
        torch.testing.assert_close(our_scores[l][:, :-WINDOW] / WINDOW, avg[:, :-WINDOW],
                                   rtol=1e-5, atol=1e-7)
        for b in range(ids.shape[0]):
            top = sorted(avg[b].topk(N // 2).indices.tolist())
            assert ours[l][b] == top, f"layer {l} sample {b}"
            heads_differ |= kv[l][b][0] != kv[l][b][1]
    assert heads_differ  # so per-head sets really cannot be compared with a per-layer policy


@pytest.mark.parametrize("beta", [20, 2])  # 20: the bottom layer is capped at N - window
def test_pyramidkv_same_budgets_and_positions_one_kv_head(beta):
    model, ids = _model(n_kv_heads=1), _prompt()
    kv, _ = _kvpress_run(model, kvpress.PyramidKVPress(compression_ratio=0.5, window_size=WINDOW,
                                                       kernel_size=KERNEL, beta=beta), ids)
    policy = policy_class("pyramidkv")(keep_ratio=0.5, n_sink=0, window=WINDOW, kernel=KERNEL,
                                       beta=float(beta))
    ours, _ = _ours_run(model, policy, ids)
    sizes = [len(x[0]) for x in ours]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]  # really a pyramid
    _assert_same(kv, ours)


def test_h2o_scores_are_observed_attention_without_normalisation():
    """ObservedAttentionPress = attention column sums / (number of queries seeing the slot),
    averaged over heads; ours (H2O) = the raw column sums averaged over heads."""
    model, ids = _model(n_kv_heads=2, attn="eager"), _prompt()
    _, kv_scores = _kvpress_run(model, kvpress.ObservedAttentionPress(compression_ratio=0.5), ids)
    _, our_scores = _ours_run(model, policy_class("h2o")(keep_ratio=0.5, n_sink=0), ids)
    n_queries = torch.arange(N, 0, -1, dtype=torch.float32)
    for l in range(model.config.num_hidden_layers):
        torch.testing.assert_close(our_scores[l] / n_queries, kv_scores[l].mean(1),
                                   rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Known differences, pinned
# ------------------------------------------------------------------------------------------------
def test_budget_rounding_differs_by_one():
    keep_ratio = 0.4  # N * keep = 25.6: kvpress floors (25), ours rounds the forget count (26)
    model, ids = _model(n_kv_heads=1), _prompt()
    kv, _ = _kvpress_run(model, kvpress.StreamingLLMPress(compression_ratio=1 - keep_ratio,
                                                          n_sink=4), ids)
    ours, _ = _ours_run(model, policy_class("streamingllm")(keep_ratio=keep_ratio, n_sink=4), ids)
    for kv_l, ours_l in zip(kv, ours):
        for kv_b, ours_b in zip(kv_l, ours_l):
            assert (len(kv_b[0]), len(ours_b)) == (25, 26)
            assert set(kv_b[0]) < set(ours_b)


def test_pyramidkv_short_prompt_fallback_only_in_kvpress():
    keep_ratio = 0.25  # smallest pyramid budget 16 / 20 < window: kvpress falls back to uniform
    model, ids = _model(n_kv_heads=1), _prompt()
    kv, _ = _kvpress_run(model, kvpress.PyramidKVPress(compression_ratio=1 - keep_ratio,
                                                       window_size=WINDOW, kernel_size=KERNEL),
                         ids)
    policy = policy_class("pyramidkv")(keep_ratio=keep_ratio, n_sink=0, window=WINDOW,
                                       kernel=KERNEL)
    ours, _ = _ours_run(model, policy, ids)
    kv_sizes = [len(x[0][0]) for x in kv]
    our_sizes = [len(x[0]) for x in ours]
    assert kv_sizes == [int(N * keep_ratio)] * len(kv)
    assert our_sizes[0] > our_sizes[-1]
    assert abs(sum(our_sizes) - sum(kv_sizes)) <= len(kv)  # same total, up to rounding
