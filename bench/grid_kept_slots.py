"""What each policy keeps on the grid subject: text vs image slots, and image slots of the asked cell.

The accuracy table of ``tgvkv-bench accuracy`` (subject ``tiny-llava-grid``) says how much each
policy loses; this says why. For each test question it runs the prefill through
``tgvkv.apply(model, policy)`` (``generate(max_new_tokens=1)``: the eviction after the prompt,
no decode-time eviction yet) and reads the kept positions of every layer
(``TGVKVCache.kept_positions``). Per policy and keep ratio, averaged over questions and layers:

- ``text``: kept text slots (of the prompt's text slots: system text, role tags, question);
- ``image``: kept image slots (of 256);
- ``in cell``: the share of the kept image slots that lie in the asked cell (one quarter of the
  image: 25% by chance); the cell of image slot ``j`` is that of its 8x8 patch in the 16x16 patch
  grid (row-major, as CLIP orders them);
- ``no image``: the share of (question, layer) pairs that keep no image slot at all.

A second table reads the full-cache model's own attention (eager, no eviction), per layer: the
share of the image attention that falls on the asked cell, from the last prompt slot (mean over
heads, and its best head) and summed over all guidance rows (the text after the image, the rows
TGV-KV's vision scores and SnapKV's window read), so one sees where the model's grounding lives.

Usage::

    python bench/grid_kept_slots.py [--limit 100] [--keep-ratio 0.5 0.2 0.1 0.05]
        [--policy tgvkv snapkv ...] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tgvkv  # noqa: E402
from tgvkv.bench.env import cpu_model  # noqa: E402
from tgvkv.eval import load_dataset, load_model, make_policy, subject_path  # noqa: E402
from tgvkv.eval.easy_vqa_grid import patch_cells  # noqa: E402
from tgvkv.eval.harness import _prepare  # noqa: E402

POLICIES = ("tgvkv", "tgvkv-no-tpr", "tgvkv-guidance-text", "h2o", "snapkv", "pyramidkv",
            "streamingllm", "random")


def image_slots(model, x):
    """([n_image] prompt positions of the image slots, [n_image] the grid cell of each)."""
    img_pos = torch.nonzero(x["input_ids"][0] == model.config.image_token_id)[:, 0]
    return img_pos, patch_cells(len(img_pos))


def measure(model, samples, inputs, policy_name, keep_ratio):
    text = image = in_cell = no_image = pairs = 0
    for s, x in zip(samples, inputs):
        cell_of = dict(zip(*(t.tolist() for t in image_slots(model, x))))
        with tgvkv.apply(model, make_policy(policy_name, keep_ratio)) as handle:
            with torch.inference_mode():
                model.generate(**x, max_new_tokens=1, do_sample=False, num_beams=1)
            cache = handle.last_cache
            for layer in range(len(cache.layers)):
                kept = cache.kept_positions(layer, 0)
                img = [p for p in kept if p in cell_of]
                text += len(kept) - len(img)
                image += len(img)
                in_cell += sum(cell_of[p] == s["target"] for p in img)
                no_image += not img
                pairs += 1
    return {"policy": policy_name, "keep_ratio": keep_ratio,
            "text_slots": text / pairs, "image_slots": image / pairs,
            "in_cell": in_cell / image if image else float("nan"),
            "no_image": no_image / pairs}


def attention_on_cell(model, samples, inputs):
    """Per layer: the mean over questions of the share of image attention on the asked cell,
    from the last prompt slot (head mean, best head) and from all guidance rows (head mean)."""
    impl = model.config._attn_implementation, model.config.text_config._attn_implementation
    model.config._attn_implementation = model.config.text_config._attn_implementation = "eager"
    try:
        last = guided = None
        for s, x in zip(samples, inputs):
            img_pos, cells = image_slots(model, x)
            in_cell = cells == s["target"]
            first_text = int(img_pos.max()) + 1
            with torch.inference_mode():
                att = model(**x, output_attentions=True).attentions  # L x [1, H, N, N]
            img = torch.stack([a[0][:, :, img_pos] for a in att])  # [L, H, N, 256]
            lst = img[:, :, -1]
            l_share = lst[..., in_cell].sum(-1) / lst.sum(-1)  # [L, H]
            g = img[:, :, first_text:].sum(2)
            g_share = (g[..., in_cell].sum(-1) / g.sum(-1)).mean(1)  # [L]
            last = l_share if last is None else last + l_share
            guided = g_share if guided is None else guided + g_share
    finally:
        model.config._attn_implementation, model.config.text_config._attn_implementation = impl
    last, guided = last / len(samples), guided / len(samples)
    return [{"layer": i, "last_slot_head_mean": float(last[i].mean()),
             "last_slot_best_head": float(last[i].max()), "guidance_rows_head_mean": float(guided[i])}
            for i in range(len(guided))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=100, help="first N questions of easy-vqa-grid")
    ap.add_argument("--keep-ratio", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    ap.add_argument("--policy", nargs="+", default=list(POLICIES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor, _ = load_model(subject_path("tiny-llava-grid"), "cpu")
    samples = load_dataset("easy-vqa-grid", args.limit)
    inputs = _prepare(processor, samples, "cpu")
    n = int(inputs[0]["input_ids"].shape[1])
    n_img = len(image_slots(model, inputs[0])[0])
    rows = [measure(model, samples, inputs, p, k)
            for p in args.policy for k in args.keep_ratio]
    print(f"tiny-llava-grid on the first {len(samples)} questions of easy-vqa-grid: prompt "
          f"{n} slots = {n_img} image + {n - n_img} text (first question), "
          f"{model.config.text_config.num_hidden_layers} layers")
    print("| policy | keep | text slots kept | image slots kept (of 256) | in the asked cell | "
          "layers with no image slot |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['keep_ratio']:g} | {r['text_slots']:.1f} | "
              f"{r['image_slots']:.1f} | {100 * r['in_cell']:.1f}% | {100 * r['no_image']:.1f}% |")
    att = attention_on_cell(model, samples, inputs)
    print("\nfull cache, share of the image attention on the asked cell (25% = uniform):")
    print("| layer | last prompt slot, head mean | last prompt slot, best head | all guidance "
          "rows, head mean |")
    print("|---|---|---|---|")
    for a in att:
        print(f"| {a['layer']} | {100 * a['last_slot_head_mean']:.1f}% | "
              f"{100 * a['last_slot_best_head']:.1f}% | {100 * a['guidance_rows_head_mean']:.1f}% |")
    out = {"command": "python bench/grid_kept_slots.py " + " ".join(sys.argv[1:] if argv is None
                                                                      else argv),
           "cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
           "n_questions": len(samples), "prompt_slots": n, "image_slots": n_img, "rows": rows,
           "attention_on_cell": att,
           "wall_s": round(time.time() - t0, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
