#!/usr/bin/env python3
"""Train the tiny LLaVA-style VLM on easy-VQA that tgvkv uses to measure what eviction costs.

The result is a standard Hugging Face ``LlavaForConditionalGeneration`` (a tiny CLIP vision tower,
a GELU projector and a Llama language model with GQA) saved with its word-level tokenizer and a
``LlavaProcessor`` to ``tgvkv/data/tiny-llava-easyvqa/``, so that
``AutoProcessor.from_pretrained(path)`` / ``LlavaForConditionalGeneration.from_pretrained(path)``
work offline.

Prompt (the processor expands ``<image>`` to 64 image tokens, one per 8x8 patch)::

    <s> USER : <image>x64 what is the color of the triangle ? ASSISTANT :

Target (teacher forcing on the response only)::

    the answer is red </s>

The answer word is deliberately *not* the first generated token: the first token is predicted from
the prefill logits, before any KV eviction happens, so a one-word answer would be immune to
eviction and the accuracy benchmark would measure nothing. With the short "the answer is" lead-in
the answer word is produced at the fourth decode step, from the evicted cache.

Reproducible: fixed seeds, CPU, deterministic algorithms, ``--threads`` intra-op threads (the
``--max-minutes`` safety stop cuts the schedule short if it triggers: it is reported).
The committed model was made with the defaults (1,197 steps of 64 questions, 14.6 min on one
thread of a shared 2-core machine; see ``training_info.json`` beside the weights)::

    python scripts/train_tiny_vlm.py --out tgvkv/data/tiny-llava-easyvqa --threads 1

Result: 80.2 % on the 9,673 easy-VQA test questions, 67.2 % with blank images, well short of the
95 % target (the vision tower learns slowly at this budget; see bench/results/accuracy_cpu.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 64
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64; the CLS token is dropped ("default")
ANSWER_LEAD = "the answer is"
TEMPLATE_WORDS = ["USER", ":", "ASSISTANT", "the", "answer", "is", ".", "?"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT : "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def prompt_text(question: str) -> str:
    """The prompt of one question, as the processor's chat template writes it."""
    return f"USER : <image> {question} ASSISTANT :"


def build_tokenizer(words):
    """Word-level tokenizer over ``words`` (+ specials), as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in sorted(set(words)):
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        model_max_length=256, padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor(tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_rescale=True, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>",
                          chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=2 * args.vision_hidden,
        num_hidden_layers=args.vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE, projection_dim=args.hidden, hidden_act="gelu")
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    cfg = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", image_seq_length=NUM_IMAGE_TOKENS)
    cfg.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 8
    return model


def load_split(split, processor):
    """(pixels [n_img, 3, 64, 64] f32, questions, answers, image_ids) of an easy-VQA split."""
    import easy_vqa
    from PIL import Image

    qs, ans, ids = (easy_vqa.get_train_questions() if split == "train"
                    else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    n = max(paths) + 1
    images = [Image.open(paths[i]).convert("RGB") for i in range(n)]
    pix = []
    for s in range(0, n, 500):
        pix.append(processor.image_processor(images[s:s + 500], return_tensors="pt")["pixel_values"])
    return torch.cat(pix).float(), qs, ans, ids


def encode_batch(tokenizer, questions, answers, image_token_id):
    """Right-padded input ids, attention mask and labels (response tokens only)."""
    seqs, labels = [], []
    img = [image_token_id] * NUM_IMAGE_TOKENS
    for q, a in zip(questions, answers):
        p = tokenizer(prompt_text(q).replace("<image>", "<image>" * NUM_IMAGE_TOKENS))["input_ids"]
        assert p.count(image_token_id) == NUM_IMAGE_TOKENS, q
        r = tokenizer(f"{ANSWER_LEAD} {a}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(l)] = torch.tensor(l)
        mask[i, :len(s)] = 1
    return ids, mask, lab


def forward_logits(model, ids, mask, pix_unique, img_index):
    """Logits of the whole sequence; each unique image goes through the vision tower once."""
    feats = model.model.get_image_features(
        pixel_values=pix_unique, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
    feats = torch.stack(list(feats))[img_index]  # [B, 64, H]
    emb = model.get_input_embeddings()(ids)
    is_img = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(emb)
    emb = emb.masked_scatter(is_img, feats.to(emb.dtype))
    h = model.model.language_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    return model.lm_head(h)


@torch.no_grad()
def evaluate(model, tokenizer, pix, qs, ans, ids_, answers_vocab, limit=None, blank=False, bs=256):
    """Teacher-forced accuracy of the answer word (= greedy with the full cache when the model
    emits the lead-in, which it always does after training), restricted to the 13 answers."""
    model.eval()
    n = len(qs) if limit is None else min(limit, len(qs))
    ans_ids = torch.tensor([tokenizer.convert_tokens_to_ids(a) for a in answers_vocab])
    correct = 0
    lead = len(tokenizer(ANSWER_LEAD, add_special_tokens=False)["input_ids"])
    for s in range(0, n, bs):
        q, a, im = qs[s:s + bs], ans[s:s + bs], ids_[s:s + bs]
        ids, mask, lab = encode_batch(tokenizer, q, a, model.config.image_token_id)
        uniq, inv = torch.unique(torch.tensor(im), return_inverse=True)
        p = pix[uniq]
        if blank:
            p = torch.zeros_like(p)
        logits = forward_logits(model, ids, mask, p, inv)
        # position predicting the answer word: the last lead-in token
        first = (lab != -100).float().argmax(1)
        pos = first + lead - 1
        row = logits[torch.arange(len(q)), pos][:, ans_ids]
        pred = [answers_vocab[i] for i in row.argmax(-1).tolist()]
        correct += sum(int(x == y) for x, y in zip(pred, a))
    model.train()
    return correct / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tgvkv", "data", "tiny-llava-easyvqa"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=1.3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--open-weight", type=int, default=3,
                    help="repeat each non-yes/no question this many times per epoch")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=28.0, help="stop training after this long")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--bench-steps", type=int, default=0, help="only time this many steps")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    import easy_vqa
    answers_vocab = easy_vqa.get_answers()
    words = list(TEMPLATE_WORDS) + answers_vocab
    for q in easy_vqa.get_train_questions()[0] + easy_vqa.get_test_questions()[0]:
        words += q.replace("?", " ?").split()
    tokenizer = build_tokenizer(words)
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params/1e6:.2f}M vocab {len(tokenizer)} threads {torch.get_num_threads()}", flush=True)

    pix, qs, ans, img_ids = load_split("train", processor)
    tpix, tqs, tans, timg = load_split("test", processor)
    print(f"data loaded in {time.time()-t0:.1f}s: train {len(qs)} q / {len(pix)} img, test {len(tqs)} q", flush=True)
    # open questions (color / shape: 26% of the data) are repeated --open-weight times per
    # epoch: yes/no questions are mostly answered by the text prior ("no"), so without this the
    # vision tower gets little gradient
    pool = [i for i, a in enumerate(ans) for _ in range(1 if a in ("yes", "no") else args.open_weight)]
    steps_per_epoch = math.ceil(len(pool) / args.batch_size)
    total = int(args.epochs * steps_per_epoch) if not args.bench_steps else args.bench_steps
    warmup = min(200, total // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    gen = torch.Generator().manual_seed(args.seed)
    all_img = torch.tensor(img_ids)
    model.train()
    step, t_train, ema = 0, time.time(), None
    # Batches are uniformly shuffled questions (one epoch = every question once). Grouping the
    # questions of a few images per batch (cheaper vision tower) kept the model stuck on the
    # text-only prior: too few images per step for the vision tower to learn.
    while step < total:
        order = torch.tensor(pool)[torch.randperm(len(pool), generator=gen)]
        for s in range(0, len(order), args.batch_size):
            if step >= total:
                break
            idx = order[s:s + args.batch_size].tolist()
            ids, mask, lab = encode_batch(tokenizer, [qs[i] for i in idx], [ans[i] for i in idx],
                                          model.config.image_token_id)
            uniq, img_index = torch.unique(all_img[idx], return_inverse=True)
            logits = forward_logits(model, ids, mask, pix[uniq], img_index)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            el = time.time() - t_train
            if step % 50 == 0 or step == total:
                print(f"step {step}/{total} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} {el:.0f}s", flush=True)
            if args.eval_every and step % args.eval_every == 0:
                acc = evaluate(model, tokenizer, tpix, tqs, tans, timg, answers_vocab, limit=1000)
                print(f"  test[:1000] acc {acc:.4f}", flush=True)
            if el > args.max_minutes * 60:
                print(f"time limit reached at step {step} (schedule not finished)", flush=True)
                total = step
                break
    train_s = time.time() - t_train
    if args.bench_steps:
        print(f"{args.bench_steps} steps in {train_s:.1f}s -> {train_s/args.bench_steps:.2f}s/step, "
              f"epoch ~{steps_per_epoch*train_s/args.bench_steps/60:.1f} min")
        return
    acc = evaluate(model, tokenizer, tpix, tqs, tans, timg, answers_vocab)
    acc_blank = evaluate(model, tokenizer, tpix, tqs, tans, timg, answers_vocab, blank=True)
    yes_no = sum(a in ("yes", "no") for a in tans) / len(tans)
    print(f"test accuracy {acc:.4f} (n={len(tqs)}), blank image {acc_blank:.4f}, train {train_s/60:.1f} min", flush=True)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    info = {
        "trained_with": "scripts/train_tiny_vlm.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "bench_steps")),
        "seed": args.seed, "threads": args.threads, "steps": step, "train_minutes": round(train_s / 60, 2),
        "total_minutes": round((time.time() - t0) / 60, 2), "params": n_params,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "test_questions": len(tqs), "test_accuracy": round(acc, 4),
        "test_accuracy_blank_image": round(acc_blank, 4),
        "test_majority_yes_no_share": round(yes_no, 4),
        "prompt": prompt_text("<question>"), "response": f"{ANSWER_LEAD} <answer> </s>",
        "answer_lead": ANSWER_LEAD, "num_image_tokens": NUM_IMAGE_TOKENS,
    }
    with open(os.path.join(out, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
