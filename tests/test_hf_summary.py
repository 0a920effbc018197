"""What a user sees around generate(): the eviction summary and its log line, the cache argument
under both of its names (transformers >= 5.24 says ``cache``, older releases ``past_key_values``),
foreign caches refused before anything runs (also with a streamer in another thread), and one
patched model serving two threads at once."""

import logging
import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# one xdist worker runs this module (its module/session fixture is built once)
pytestmark = pytest.mark.xdist_group("hf_summary")


pytest.importorskip("transformers")

import tgvkv.hf as hf  # noqa: E402
from tgvkv import testing as tiny  # noqa: E402
from tgvkv.policy import TGVKV  # noqa: E402

GEN = dict(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def llava():
    return tiny.build("tiny-llava")


def _kv_bytes_dense(model, inp):
    cfg = model.config.get_text_config()
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    B, N = inp["input_ids"].shape
    return 2 * cfg.num_hidden_layers * B * cfg.num_key_value_heads * N * hd * 4  # fp32 K and V


def test_summary_after_generate(llava):
    inp = tiny.make_inputs(llava, [[6, "image", 9], [3, "image", 5, "image", 7]])
    with hf.apply(llava, TGVKV(keep_ratio=0.2)) as h:
        llava.generate(**inp, **GEN)
        s = h.summary()
        cache = h.last_cache
    L = llava.config.get_text_config().num_hidden_layers
    real = int(inp["attention_mask"].sum())
    assert s.evicted and len(s.kept) == len(s.total) == L
    assert s.total == (real,) * L
    assert list(s.kept) == cache.result[1].sum(1).tolist()
    assert all(0 < k < t for k, t in zip(s.kept, s.total))
    assert s.achieved == pytest.approx(sum(s.kept) / (L * real))
    assert abs(s.achieved - 0.2) < 0.1, s.achieved  # budgets round per layer and keep 5 floors
    assert s.bytes_before == _kv_bytes_dense(llava, inp)
    assert 0 < s.bytes_after < s.bytes_before
    assert s.evict_ms > 0 and s.keep_ratio == 0.2
    text = str(s)
    assert "keep ratio asked 0.2" in text and len(text.splitlines()) == L + 1


def test_summary_passthrough(llava):
    inp = tiny.make_inputs(llava, [[6, "image", 9]])
    with hf.apply(llava, TGVKV(keep_ratio=1.0)) as h:
        llava.generate(**inp, **GEN)
        s = h.summary()
    assert not s.evicted and s.kept == s.total and s.bytes_before == s.bytes_after
    assert s.achieved == 1.0


def test_summary_is_logged_at_info_only(llava, caplog):
    inp = tiny.make_inputs(llava, [[6, "image", 9]])
    with hf.apply(llava, TGVKV(keep_ratio=0.2)) as h:
        with caplog.at_level(logging.WARNING, logger="tgvkv"):
            llava.generate(**inp, **GEN)
        assert not [r for r in caplog.records if r.name.startswith("tgvkv")]
        with caplog.at_level(logging.INFO, logger="tgvkv"):
            llava.generate(**inp, **GEN)
        msgs = [r.getMessage() for r in caplog.records if r.name == "tgvkv"]
        assert len(msgs) == 1 and msgs[0] == str(h.summary())


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_cache_under_either_name(llava, name):
    if name == "cache" and hf.cache_arg_name(llava) != "cache":
        pytest.skip("transformers < 5.24 has no `cache` argument")
    inp = tiny.make_inputs(llava, [[6, "image", 9]])
    with hf.apply(llava, TGVKV(keep_ratio=0.2)) as h:
        ref = llava.generate(**inp, **GEN)
        got = llava.generate(**inp, **GEN, **{name: h.new_cache()})
        assert h.last_cache.result is not None  # evicted
        assert torch.equal(ref, got)
        with torch.no_grad():
            cache = h.new_cache()
            out = llava(**inp, **{name: cache}, use_cache=True)
        assert hf.output_cache(out) is cache and cache.result is not None
        from transformers import DynamicCache

        with pytest.raises(TypeError, match="not a TGVKVCache"):
            llava.generate(**inp, **GEN, **{name: DynamicCache(config=llava.config)})


def test_foreign_cache_with_streamer_does_not_hang(llava):
    from transformers import DynamicCache, TextIteratorStreamer

    class _Tok:  # the streamer only needs decode()
        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    inp = tiny.make_inputs(llava, [[6, "image", 9]])
    errors = []
    with hf.apply(llava, TGVKV(keep_ratio=0.2)):
        streamer = TextIteratorStreamer(_Tok(), timeout=60)

        def run():
            try:
                llava.generate(**inp, **GEN, streamer=streamer,
                               **hf.cache_kwargs(llava, DynamicCache(config=llava.config)))
            except TypeError as e:
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        chunks = list(streamer)  # ends (no queue.Empty after 60 s): the stream was closed
        t.join(60)
    assert not t.is_alive()
    assert len(errors) == 1 and "not a TGVKVCache" in str(errors[0])
    assert "".join(chunks) == ""


def test_two_threads_one_patched_model(llava):
    prompts = [[[6, "image", 9]], [[3, "image", 5, "image", 11]], [[10, "image", 4]],
               [[2, "image", 15]]]
    inputs = [tiny.make_inputs(llava, p, seed=i) for i, p in enumerate(prompts)]
    with hf.apply(llava, TGVKV(keep_ratio=0.2)):
        sequential = [llava.generate(**inp, **GEN) for inp in inputs]
        for _ in range(3):
            results, errors = [None] * len(inputs), []
            barrier = threading.Barrier(len(inputs))

            def run(i):
                try:
                    barrier.wait()
                    results[i] = llava.generate(**inputs[i], **GEN)
                except Exception as e:  # noqa: BLE001  (reported below)
                    errors.append(e)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            for seq, got in zip(sequential, results):
                assert torch.equal(seq, got)


def test_generate_without_cache_warns(llava):
    inp = tiny.make_inputs(llava, [[6, "image", 9]])
    ref = llava.generate(**inp, **GEN, use_cache=False)
    with hf.apply(llava, TGVKV(keep_ratio=0.2)):
        with pytest.warns(UserWarning, match="nothing is evicted"):
            got = llava.generate(**inp, **GEN, use_cache=False)
    assert torch.equal(ref, got)
