#!/usr/bin/env python3
"""Train the tiny LLaVA-style VLM on easy-VQA that tgvkv uses to measure what eviction costs.

The result is a standard Hugging Face ``LlavaForConditionalGeneration`` (a tiny CLIP vision tower,
a GELU projector and a Llama language model with GQA) saved with its word-level tokenizer and a
``LlavaProcessor`` to ``src/tgvkv/data/tiny-llava-easyvqa/``, so that
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

Recipe (what it took; each step is measured in bench/results/accuracy_cpu.md):

1. Stage 1, the vision tower alone (``pretrain_vision``): a shape + colour classifier of the 4,000
   train images (labels read off the train questions by ``image_labels``; random flips), like the
   pretrained CLIP tower of a real LLaVA. Trained only through the language model's answer loss,
   the tower never learned shape (47.8 % on shape questions, 80.2 % overall).
2. Stage 2, the whole VLM with the tower frozen (its features of each image and its 3 flips
   cached): projector + language model on the questions, open ones 3x.
3. Extra yes/no questions made from the same train labels (``synthetic_yes_no``): every image
   asked about every colour and shape word, plus 3 more about its own, in the split's own
   templates. Without them the model answered "is there a red shape?" from the text prior ("no",
   right for 7 of 8 images) and memorised the few positive cases per image (0-23 % on them):
   comparing the asked word with the seen attribute has no first-order signal in the natural
   data. Repeating the rare answers (``--balance-yes-no 1``) made it worse: exact duplicates
   were memorised, yes/no fell to chance.

Reproducible: fixed seeds, CPU, deterministic algorithms, ``--threads`` intra-op threads (the
``--max-minutes`` safety stop cuts the schedule short if it triggers: it is reported).
The committed model was made with the defaults (see ``training_info.json`` beside the weights)::

    python scripts/train_tiny_vlm.py --out src/tgvkv/data/tiny-llava-easyvqa

Result: 97.2 % on the 9,673 easy-VQA test questions (shape 97.9 %, colour 100 %, yes/no 96.6 %),
56.7 % with blank images (the yes/no prior); 0.93 M parameters; 14.1 min in all on the 2 threads of
a 2-core Xeon (stage 1 1.8 min, stage 2 11.8 min, 4,010 steps of 64 questions).

The grid subject (``--task grid``)
---------------------------------
The second subject, ``src/tgvkv/data/tiny-llava-grid``, is shaped more like the paper's models:
8 decoder layers (GQA, 4 query / 2 KV heads), 256 image tokens per prompt (a 128x128 image, patch
8) and a chat-template prompt with a system text before the image and the question after it::

    <s> SYSTEM : the image is a grid of four pictures . answer the question about one of them
    with one word . USER : <image>x256 what color is the triangle ? ASSISTANT :

The image is a 2x2 grid of easy-VQA images and the question picks one cell, by position or by
attribute (:mod:`tgvkv.eval.easy_vqa_grid`, the built-in dataset ``easy-vqa-grid``), so which image
tokens matter depends on the question. Train grids are made of train-split images only, test grids
of test-split images. Recipe, all with the settings of ``GRID_DEFAULTS``:

1. Stage 1 (``pretrain_vision_grid``): the vision tower as a shape + colour classifier of the cells
   of random train grids, a linear head on every patch predicting its cell's classes (cells
   randomly flipped), so that every image token carries what its cell shows.
2. Stage 2: projector + language model on a fixed pool of ``--train-grids`` train grids (the frozen
   tower's features cached), each training row one grid with ``--questions-per-row`` of the
   questions it allows as chat turns (``encode_packed``: the first turn is exactly the test
   prompt; the later ones reuse the image prefix, four answers for the price of ~1.2 rows).
   Beside the answer loss, an attention loss (``--attn-weight``, ``CellAttention``): layer
   ``--attn-layer``'s first ``--attn-heads`` query heads, from the last prompt token and the
   response's lead-in, should put their attention on the asked cell's image slots (-log of that
   mass). It is the pointer a real VLM's text tokens learn from scale; without it the 8-layer LM
   learns to read the right cell too late for the time budget (run 6 below). ``--pool-weight``
   (off: it did not help, run 8) makes an earlier layer pool each cell.

Committed: the weights of the default command itself, ``python scripts/train_tiny_vlm.py --task
grid`` (seed 0, 2 threads, 1,950 stage-2 steps, 39.3 min in all; the CPU model was not recorded): **90.4 %**
on the 500 test questions (position->shape 95.6, position->colour 99.1, shape->colour 77.5,
colour->shape 90.1 %), **21.4 %** with the image blanked (majority "rectangle" 19.0 %), 0.74 M
parameters, 2.9 MB; ``training_info.json`` beside them. Re-running the command (with
``--max-minutes 60``, on a machine shared with other work) wrote the same ``model.safetensors``
bit for bit (sha256 ``8c9e1896...70b8``). The 37-minute safety stop is wall-clock: on a much
slower machine it would cut stage 2 short (reported) and give other weights. History (``bench/results/grid_subject_attempts.md``):
Run 3 (1.0 epoch of stage 2, no cell-id loss) reached 39.6 % on the 500 test questions (24.8 %
blanked; majority 19.0 %) in 17 min. Run 4 (stage 1 also teaches every patch its own cell,
``--cell-id-weight``; 3.3 epochs of stage 2) was at 46.0 % / 51.0 % after 330 / 660 of its 990
stage-2 steps (stopped by hand). Run 6 (run 4 plus ``--init-std 0.08`` and 7 epochs of stage 2, 2,100
steps, 38 min in all) reached **62.8 %** (24.8 % blanked): the attribute questions are learned late, the
position ones not yet; the language model learns to read the right cell too slowly for the
45-minute budget with that recipe. With the attention loss (run 7, stopped at step 1,075 of
1,950) it read 68.0 % after 500 steps and 76.8 % after 1,000: position and colour lookups work,
the lookup by shape ("what color is the triangle?") stays near 40 %; the pooling loss (run 8) and
four supervised heads with RoPE base 1e6 (run 9) were worse. ``GRID_DEFAULTS`` are run 7's: run
to its end (1,950 steps, from its saved stage-1 tower) it reached **94.0 %**, 26.4 % blanked, in
~38 min with stage 1; the default command's own run (the committed weights, above) 90.4 %: the
same settings from a freshly trained tower, a different stage-2 trajectory.
Stage 2 logs, every 25 steps, the teacher-forced accuracy of the answer words of the last 400
training questions of each kind (on grids not seen before during its first epoch), where learning
to read the right cell shows as a jump. ``--oracle-features`` is a diagnostic: stage 2 on perfect
patch features (fixed random embeddings of each patch's cell, shape and colour), to tell whether
the tower or the language model limits a recipe; ``--init-std`` draws the language model's
weights from N(0, std) instead of transformers' 0.02.
It writes ``training_info.json`` (full-cache and blank-image accuracy, the majority answer's
share, minutes, versions) beside the weights.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys

import numpy as np
import torch
import torch.nn.functional as F

try:  # the grid task and the easy-VQA labels live in the package (tgvkv.eval.easy_vqa_grid)
    from tgvkv.eval import easy_vqa_grid as grid_data
except ImportError:  # a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from tgvkv.eval import easy_vqa_grid as grid_data
from tgvkv.bench.env import cpu_model  # noqa: E402

SHAPES = grid_data.SHAPES
image_labels = grid_data.image_labels
yes_no_group = grid_data.yes_no_group
patch_cells = grid_data.patch_cells

IMAGE_SIZE = 64
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64; the CLS token is dropped ("default")
ANSWER_LEAD = "the answer is"
TEMPLATE_WORDS = ["USER", ":", "ASSISTANT", "the", "answer", "is", ".", "?"]


def chat_template(system=None):
    """The processor's chat template; with ``system``, a system turn (the message's own, else
    ``system``) comes first, as in real chat templates that add a default system prompt."""
    head = ""
    if system is not None:
        head = ("{% if messages[0]['role'] == 'system' %}SYSTEM : {{ messages[0]['content'] }} "
                "{% else %}SYSTEM : " + system + " {% endif %}")
    return head + (
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


CHAT_TEMPLATE = chat_template()


def prompt_text(question: str, system=None) -> str:
    """The prompt of one question, as the processor's chat template writes it."""
    head = "" if system is None else f"SYSTEM : {system} "
    return f"{head}USER : <image> {question} ASSISTANT :"


def build_tokenizer(words, max_length=256):
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
        model_max_length=max_length, padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor(tokenizer, image_size=IMAGE_SIZE, template=CHAT_TEMPLATE):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_rescale=True, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>",
                          chat_template=template)


def build_model(tokenizer, args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    image_size = getattr(args, "image_size", IMAGE_SIZE)
    n_image = (image_size // PATCH_SIZE) ** 2
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=2 * args.vision_hidden,
        num_hidden_layers=args.vision_layers, num_attention_heads=4, image_size=image_size,
        patch_size=PATCH_SIZE, projection_dim=args.hidden, hidden_act="gelu")
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=getattr(args, "heads", 4),
        num_key_value_heads=getattr(args, "kv_heads", 2),
        head_dim=getattr(args, "head_dim", 0) or args.hidden // getattr(args, "heads", 4),
        max_position_embeddings=getattr(args, "max_positions", 256), rms_norm_eps=1e-5,
        rope_theta=float(getattr(args, "rope_theta", 10000.0)),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=bool(args.tie_embeddings))
    cfg = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", image_seq_length=n_image)
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.tie_word_embeddings = bool(args.tie_embeddings)
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


def encode_batch(tokenizer, questions, answers, image_token_id, n_image=NUM_IMAGE_TOKENS,
                 system=None):
    """Right-padded input ids, attention mask and labels (response tokens only)."""
    seqs, labels = [], []
    for q, a in zip(questions, answers):
        p = tokenizer(prompt_text(q, system).replace("<image>", "<image>" * n_image))["input_ids"]
        assert p.count(image_token_id) == n_image, q
        r = tokenizer(f"{ANSWER_LEAD} {a}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    return pad_rows(list(zip(seqs, labels)), tokenizer.pad_token_id)


def pad_rows(rows, pad_id):
    """Right-padded (input ids, attention mask, labels) of ``rows`` [(ids, labels), ...]."""
    T = max(len(s) for s, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (s, l) in enumerate(rows):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(l)] = torch.tensor(l)
        mask[i, :len(s)] = 1
    return ids, mask, lab


def patch_features(model, pix):
    """The vision features the projector sees: hidden_states[vision_feature_layer] without CLS."""
    out = model.model.vision_tower(pix, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def pretrain_vision(model, pix, shape, colour, test, args, n_colours):
    """Stage 1: train the vision tower alone as a shape + colour classifier of the train images.

    A linear head on the mean of the patch features; random horizontal/vertical flips (they keep
    both classes). Training it through the language model's answer loss alone left the tower
    unable to tell shapes apart (47.8 % on shape questions at this budget); this stage gives it
    the direct signal, like the pretrained CLIP tower of a real LLaVA. The head is thrown away.
    Returns (test shape accuracy, test colour accuracy) of the linear head.
    """
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(SHAPES) + n_colours)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.05)
    bs = 64
    steps = args.vision_epochs * math.ceil(len(pix) / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(args.seed + 1)
    ns = len(SHAPES)

    def logits(p):
        return head(patch_features(model, p).mean(1))

    tower.train()
    t0 = time.time()
    for ep in range(args.vision_epochs):
        perm = torch.randperm(len(pix), generator=gen)
        for s in range(0, len(pix), bs):
            b = perm[s:s + bs]
            p = pix[b]
            flips = torch.rand(2, generator=gen)
            if flips[0] < 0.5:
                p = p.flip(3)
            if flips[1] < 0.5:
                p = p.flip(2)
            o = logits(p)
            loss = (F.cross_entropy(o[:, :ns], shape[b], ignore_index=-1)
                    + F.cross_entropy(o[:, ns:], colour[b], ignore_index=-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (ep + 1) % 5 == 0 or ep + 1 == args.vision_epochs:
            print(f"vision epoch {ep+1}/{args.vision_epochs} loss {loss.item():.4f} "
                  f"{time.time()-t0:.0f}s", flush=True)
    tpix, tshape, tcolour = test
    with torch.no_grad():
        o = torch.cat([logits(tpix[s:s + 250]) for s in range(0, len(tpix), 250)])
    m = tshape >= 0
    acc_s = (o[m, :ns].argmax(1) == tshape[m]).float().mean().item()
    m = tcolour >= 0
    acc_c = (o[m, ns:].argmax(1) == tcolour[m]).float().mean().item()
    return acc_s, acc_c


def repeats(questions, answers, open_weight, balance_yes_no):
    """How many times each training question appears per epoch.

    Open questions (colour / shape, 26 % of the data) appear ``open_weight`` times. With
    ``balance_yes_no`` (off by default) the rarer answer of each kind of yes/no question is
    repeated until yes and no are about even ("is there a red shape?" is "no" for 7 of 8 images);
    this made the model memorise the repeated questions and answer yes/no at chance, so the
    default instead adds new questions (:func:`synthetic_yes_no`).
    """
    counts = {}
    for q, a in zip(questions, answers):
        if a in ("yes", "no"):
            key = yes_no_group(q) + (a,)
            counts[key] = counts.get(key, 0) + 1
    out = []
    for q, a in zip(questions, answers):
        if a not in ("yes", "no"):
            out.append(open_weight)
        elif balance_yes_no:
            g = yes_no_group(q)
            other = counts.get(g + ("no" if a == "yes" else "yes",), 0)
            out.append(max(1, round(other / counts[g + (a,)])))
        else:
            out.append(1)
    return out


def batches(phases, batch_size, gen):
    """Index batches: for each ``(pool, n_batches)`` phase, ``n_batches`` batches (``None``: no
    end) from shuffled passes over ``pool``; a new phase starts with a fresh shuffle."""
    for pool, n in phases:
        done = 0
        while n is None or done < n:
            order = torch.tensor(pool)[torch.randperm(len(pool), generator=gen)]
            for s in range(0, len(order), batch_size):
                if n is not None and done >= n:
                    break
                yield order[s:s + batch_size].tolist()
                done += 1


def synthetic_yes_no(questions, answers, shape, colour, colours, gen, extra_true=0):
    """Extra yes/no questions about the train images: for every image whose shape and colour are
    known (:func:`image_labels`), one question per colour and per shape word, plus ``extra_true``
    more about its own colour and its own shape, each in a random yes/no template of the split
    ("is there not a {colour} shape?", "does the image contain a {shape}?", ...), answered from
    the labels. Returns (questions, answers, image_ids).

    The split asks each image only 2-3 colour questions, so a small language model can memorise
    the answer per image instead of learning to compare the asked colour with the one it sees.
    """
    templates = {"colour": set(), "shape": set()}
    for q, a in zip(questions, answers):
        if a not in ("yes", "no"):
            continue
        words = q.replace("?", " ?").split()
        hits = [(i, w) for i, w in enumerate(words) if w in colours or w in SHAPES]
        if len(hits) == 1:
            i, w = hits[0]
            kind = "colour" if w in colours else "shape"
            templates[kind].add(" ".join(words[:i] + ["{}"] + words[i + 1:]).replace(" ?", "?"))
    templates = {k: sorted(v) for k, v in templates.items()}
    out_q, out_a, out_i = [], [], []
    for img in range(len(shape)):
        if shape[img] < 0 or colour[img] < 0:
            continue
        truth = {"colour": colours[int(colour[img])], "shape": SHAPES[int(shape[img])]}
        for kind, vocab in (("colour", colours), ("shape", SHAPES)):
            for w in list(vocab) + [truth[kind]] * extra_true:
                t = templates[kind][int(torch.randint(len(templates[kind]), (1,), generator=gen))]
                q = t.format(w)
                holds = (w == truth[kind]) != yes_no_group(q)[1]
                out_q.append(q)
                out_a.append("yes" if holds else "no")
                out_i.append(img)
    return out_q, out_a, out_i


def forward_logits(model, ids, mask, feats, img_index):
    """Logits of the whole sequence from the patch features ``feats`` [n_images, n_image, Hv] of
    the unique images of the batch (see :func:`patch_features`); ``img_index`` [B] picks each
    row's."""
    feats = model.model.multi_modal_projector(feats)[img_index]  # [B, n_image, H]
    emb = model.get_input_embeddings()(ids)
    is_img = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(emb)
    emb = emb.masked_scatter(is_img, feats.to(emb.dtype))
    h = model.model.language_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    return model.lm_head(h)


class CellAttention:
    """The attention loss of the grid subject (``--attn-weight``): a forward pre-hook on one
    decoder layer's self-attention keeps its input; :meth:`loss` is then -log of the attention
    mass that the first ``heads`` query heads give, from each query position,
    to the image slots of that query's target cell (0..3), averaged.

    It teaches one layer to look at the asked cell, which a real VLM's text tokens learn from
    scale and a 45-minute CPU model does not find on its own
    (bench/results/grid_subject_attempts.md). With ``uniform`` the loss is instead the
    cross-entropy against the uniform distribution on the target cell's visible slots (every
    slot of it, not just some): with image slots as queries and their own cells as targets it
    teaches a layer to pool each cell (``--pool-weight``)."""

    def __init__(self, model, layer, heads, uniform=False):
        self.attn = model.model.language_model.layers[layer].self_attn
        self.heads, self.saved, self.last = heads, None, float("nan")
        self.uniform = uniform
        self.attn.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self.saved = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                          kwargs["position_embeddings"])

    def loss(self, ids, image_token_id, cols, cells):
        """``cols`` [B, M]: M query positions of each row; ``cells`` [B, M] their target cells."""
        from transformers.models.llama.modeling_llama import rotate_half

        h, (cos, sin) = self.saved
        self.saved = None
        a = self.attn
        B, S, _ = h.shape
        D, Hk = a.head_dim, a.config.num_key_value_heads
        cos, sin = cos.expand(B, -1, -1)[:, :, None], sin.expand(B, -1, -1)[:, :, None]
        rows = torch.arange(B)[:, None]
        q = a.q_proj(h[rows, cols]).view(B, cols.shape[1], -1, D)[:, :, :self.heads]
        q = q * cos[rows, cols] + rotate_half(q) * sin[rows, cols]  # [B, M, h, D]
        k = a.k_proj(h).view(B, S, Hk, D)
        k = k * cos + rotate_half(k) * sin  # [B, S, Hk, D]
        kv = torch.arange(self.heads) // (a.config.num_attention_heads // Hk)
        scores = torch.einsum("bmhd,bshd->bhms", q, k[:, :, kv]) * a.scaling
        scores = scores.masked_fill(torch.arange(S) > cols[:, None, :, None], float("-inf"))
        logp = scores.log_softmax(-1)
        is_img = ids[0] == image_token_id
        slot_cell = torch.full((S,), -1, dtype=torch.long)
        slot_cell[is_img] = patch_cells(int(is_img.sum()))
        want = slot_cell == cells[:, None, :, None]  # [B, 1, M, S]
        if self.uniform:  # cross-entropy against the uniform distribution on the visible slots
            want = want & (torch.arange(S) <= cols[:, None, :, None])
            out = -(logp.masked_fill(~want, 0).sum(-1) / want.sum(-1)).mean()
        else:
            out = -logp.masked_fill(~want, float("-inf")).logsumexp(-1).mean()
        self.last = out.item()
        return out


def lm_step(model, opt, sched, ids, mask, lab, feats, img_index, keep_logits=False, aux=None):
    """One optimiser step of the answer loss (teacher forcing on the response tokens), plus
    every ``f()`` of ``aux`` (losses of the same forward pass) if given; returns the answer loss
    (and the logits, detached, with ``keep_logits``)."""
    logits = forward_logits(model, ids, mask, feats, img_index)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1))
    total = loss if aux is None else loss + sum(f() for f in aux)
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return (loss, logits.detach()) if keep_logits else loss


def cosine_schedule(opt, warmup, total):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))


@torch.no_grad()
def evaluate(model, tokenizer, pix, qs, ans, ids_, answers_vocab, limit=None, blank=False, bs=256,
             by_type=False, n_image=NUM_IMAGE_TOKENS, system=None):
    """Teacher-forced accuracy of the answer word (= greedy with the full cache when the model
    emits the lead-in, which it always does after training), restricted to the 13 answers.
    With ``by_type``: ``(accuracy, {"shape": acc, "colour": acc, "yes/no": acc})``."""
    model.eval()
    n = len(qs) if limit is None else min(limit, len(qs))
    ans_ids = torch.tensor([tokenizer.convert_tokens_to_ids(a) for a in answers_vocab])
    correct = 0
    per_type = {"shape": [0, 0], "colour": [0, 0], "yes/no": [0, 0]}
    lead = len(tokenizer(ANSWER_LEAD, add_special_tokens=False)["input_ids"])
    for s in range(0, n, bs):
        q, a, im = qs[s:s + bs], ans[s:s + bs], ids_[s:s + bs]
        ids, mask, lab = encode_batch(tokenizer, q, a, model.config.image_token_id, n_image, system)
        uniq, inv = torch.unique(torch.tensor(im), return_inverse=True)
        p = pix[uniq]
        if blank:
            p = torch.zeros_like(p)
        logits = forward_logits(model, ids, mask, patch_features(model, p), inv)
        # position predicting the answer word: the last lead-in token
        first = (lab != -100).float().argmax(1)
        pos = first + lead - 1
        row = logits[torch.arange(len(q)), pos][:, ans_ids]
        pred = [answers_vocab[i] for i in row.argmax(-1).tolist()]
        correct += sum(int(x == y) for x, y in zip(pred, a))
        for x, y in zip(pred, a):
            t = per_type["shape" if y in SHAPES else "yes/no" if y in ("yes", "no") else "colour"]
            t[0] += int(x == y)
            t[1] += 1
    model.train()
    if by_type:
        return correct / n, {k: round(c / max(1, m), 4) for k, (c, m) in per_type.items()}
    return correct / n


# ---- the grid task (--task grid): 2x2 grids of easy-VQA images, questions about one cell ------
GRID_SYSTEM = ("the image is a grid of four pictures . answer the question about one of them "
               "with one word .")
GRID_WORDS = ["SYSTEM", "grid", "of", "four", "pictures", "about", "one", "them", "with", "word",
              "question", "which", "in", "top", "bottom", "left", "right", "shape", "what",
              "color"]


def cell_pixels(paths, ids):
    """[len(ids), 3, 64, 64] float32 easy-VQA images, normalised as the processor does
    ((x / 255 - 0.5) / 0.5): a grid's pixel values are its four cells' side by side."""
    from PIL import Image

    out = torch.empty(len(ids), 3, grid_data.CELL_SIZE, grid_data.CELL_SIZE)
    for k, i in enumerate(ids):
        with Image.open(paths[i]) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float32)
        out[k] = torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0
    return out


def compose_pixels(cells):
    """[B, 4, 3, 64, 64] cells -> [B, 3, 128, 128] grids (cell order of grid_data.POSITIONS)."""
    top = torch.cat([cells[:, 0], cells[:, 1]], dim=-1)
    bottom = torch.cat([cells[:, 2], cells[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def encode_packed(tokenizer, turns, image_token_id, n_image, system):
    """Like :func:`encode_batch`, one row per grid with several questions about it as chat turns:
    ``turns`` [[(question, answer), ...], ...]. The first turn is exactly the single-question
    prompt of the test (system, image, question); each later turn is ``USER : q ASSISTANT :``
    after the previous answer's ``</s>``. Labels: every answer (lead-in, word, ``</s>``)."""
    rows = []
    for qa in turns:
        q, a = qa[0]
        ids, _, lab = encode_batch(tokenizer, [q], [a], image_token_id, n_image, system)
        seq, labels = ids[0].tolist(), lab[0].tolist()
        for q, a in qa[1:]:
            p = tokenizer(f"USER : {q} ASSISTANT :", add_special_tokens=False)["input_ids"]
            r = (tokenizer(f"{ANSWER_LEAD} {a}", add_special_tokens=False)["input_ids"]
                 + [tokenizer.eos_token_id])
            seq += p + r
            labels += [-100] * len(p) + r
        rows.append((seq, labels))
    return pad_rows(rows, tokenizer.pad_token_id)


def quadrant_means(x):
    """[B, n, C] per-patch values of a square patch grid -> [B, 4, C], the mean of each cell."""
    B, n, C = x.shape
    side = int(round(n ** 0.5))
    return x.reshape(B, 2, side // 2, 2, side // 2, C).mean((2, 4)).reshape(B, 4, C)


def pretrain_vision_grid(model, cpix, cls, test, args, n_colours):
    """Stage 1 of the grid task: the vision tower as a shape + colour classifier of the cells of
    random train grids: a linear head on *every patch's* features predicts the classes of the
    patch's cell (each cell randomly flipped), so that each image token carries what its cell
    shows, as a pretrained tower's patch features do; the test accuracy is that of the
    cell-averaged logits.
    ``cpix`` [n, 3, 64, 64] labelled train images, ``cls`` [n, 2] their (shape, colour) classes;
    ``test``: (test cell pixels, test classes). Returns the head's test (shape, colour) accuracy
    on random test grids. The head is thrown away."""
    if args.vision_steps == 0:  # the tower as --vision-init left it (a --stage1-out of a run)
        return [float("nan"), float("nan")]
    tower = model.model.vision_tower
    ns = len(SHAPES)
    head = torch.nn.Linear(tower.config.hidden_size, ns + n_colours)
    # the cell each patch lies in, from the patch's own features (--cell-id-weight): position
    # questions then become content lookups for the language model, as colour / shape ones are
    where = torch.nn.Linear(tower.config.hidden_size, 4)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters())
                            + list(where.parameters()), lr=args.vision_lr,
                            weight_decay=0.05)
    steps = args.vision_steps
    sched = cosine_schedule(opt, 50, steps)
    gen = torch.Generator().manual_seed(args.seed + 1)
    bs = 32
    cell_of = patch_cells((args.image_size // PATCH_SIZE) ** 2)

    def draw(pix, lab, b, g, flip):
        idx = torch.randint(len(pix), (b, 4), generator=g)
        cells = pix[idx]
        if flip:
            f = torch.rand(2, b, 4, generator=g) < 0.5
            cells = torch.where(f[0, :, :, None, None, None], cells.flip(-1), cells)
            cells = torch.where(f[1, :, :, None, None, None], cells.flip(-2), cells)
        return compose_pixels(cells), lab[idx]  # [b, 3, 128, 128], [b, 4, 2]

    tower.train()
    t0 = time.time()
    for step in range(steps):
        grids, y = draw(cpix, cls, bs, gen, True)
        feats = patch_features(model, grids)  # [b, n_patches, C]
        if args.vision_objective == "patch":
            o = head(feats)  # [b, n_patches, ns + nc]
            y = y[:, cell_of]  # [b, n_patches, 2]: the classes of each patch's cell
        else:  # "cell": the mean of each cell's patch features
            o = head(quadrant_means(feats))  # [b, 4, ns + nc]
        loss = (F.cross_entropy(o[..., :ns].reshape(-1, ns), y[..., 0].reshape(-1))
                + F.cross_entropy(o[..., ns:].reshape(-1, n_colours), y[..., 1].reshape(-1)))
        if args.cell_id_weight:
            loss = loss + args.cell_id_weight * F.cross_entropy(
                where(feats).reshape(-1, 4), cell_of.repeat(len(feats)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"vision step {step+1}/{steps} loss {loss.item():.4f} {time.time()-t0:.0f}s",
                  flush=True)
    tower.eval()
    g = torch.Generator().manual_seed(args.seed + 3)
    right = torch.zeros(2)
    n = 0
    with torch.no_grad():
        for _ in range(8):
            grids, y = draw(test[0], test[1], 64, g, False)
            o = quadrant_means(head(patch_features(model, grids)))
            right[0] += (o[..., :ns].argmax(-1) == y[..., 0]).sum()
            right[1] += (o[..., ns:].argmax(-1) == y[..., 1]).sum()
            n += y[..., 0].numel()
    return (right / n).tolist()


def init_vision_from(model, path):
    """Start the vision tower from the tower of a committed LLaVA subject (``path``): the first
    subject's tower already tells easy-VQA shapes and colours on one 64x64 image, as a pretrained
    CLIP does. Its position embeddings are tiled over the grid (each cell's patch gets the
    embedding of the same patch of a single image; the CLS keeps its own)."""
    from safetensors.torch import load_file

    src = load_file(os.path.join(path, "model.safetensors"))
    pre = "vision_tower."  # how LlavaForConditionalGeneration saves it
    tower = model.model.vision_tower
    own = tower.state_dict()
    new = {}
    for k, v in own.items():
        w = src.get(pre + k)
        if w is None:
            raise ValueError(f"--vision-init {path}: no {pre + k}")
        if k.endswith("position_embedding.weight") and w.shape != v.shape:
            side, s0 = int(round((v.shape[0] - 1) ** 0.5)), int(round((w.shape[0] - 1) ** 0.5))
            r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            src_idx = 1 + (r % s0) * s0 + (c % s0)
            w = torch.cat([w[:1], w[src_idx.reshape(-1)]])
        elif k.endswith("position_ids") and w.shape != v.shape:
            w = v
        if w.shape != v.shape:
            raise ValueError(f"--vision-init {path}: {k} has shape {tuple(w.shape)}, "
                             f"expected {tuple(v.shape)}")
        new[k] = w
    tower.load_state_dict(new)


def grid_split(split):
    """(cell pixels [n, 3, 64, 64], {image id: row}, labels {image id: (shape, colour)}, classes
    [n, 2]) of the labelled images of an easy-VQA split."""
    paths, labels = grid_data.split_labels(split)
    ids = sorted(labels)
    cw = grid_data.colours()
    cls = torch.tensor([[SHAPES.index(labels[i][0]), cw.index(labels[i][1])] for i in ids])
    return cell_pixels(paths, ids), {i: r for r, i in enumerate(ids)}, labels, cls


def main_grid(args):
    """Train the grid subject (``--task grid``): see the module docstring, "The grid subject"."""
    import easy_vqa

    t0 = time.time()
    answers_vocab = easy_vqa.get_answers()
    n_image = (args.image_size // PATCH_SIZE) ** 2
    words = (list(TEMPLATE_WORDS) + GRID_WORDS + answers_vocab + GRID_SYSTEM.split()
             + [w for p in grid_data.POSITIONS for w in p.split()])
    tokenizer = build_tokenizer(words, max_length=args.max_positions)
    processor = build_processor(tokenizer, args.image_size, chat_template(GRID_SYSTEM))
    model = build_model(tokenizer, args)
    if args.init_std:
        # the language model, projector and LM head from N(0, init_std) instead of transformers'
        # 0.02: at width 64 its attention logits start near zero and learning to read the right
        # cell starts late (bench/results/grid_subject_attempts.md, the oracle-feature runs)
        g = torch.Generator().manual_seed(args.seed + 5)
        for mod in (model.model.language_model, model.model.multi_modal_projector, model.lm_head):
            for w in mod.parameters():
                if w.dim() == 2:
                    with torch.no_grad():
                        w.copy_(torch.randn(w.shape, generator=g) * args.init_std)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params/1e6:.2f}M vocab {len(tokenizer)} image tokens {n_image} "
          f"threads {torch.get_num_threads()}", flush=True)
    cpix, row, labels, cls = grid_split("train")
    tcpix, trow, tlabels, tcls = grid_split("test")
    colours = grid_data.colours()
    print(f"data: {len(cpix)} labelled train images, {len(tcpix)} test, {time.time()-t0:.0f}s",
          flush=True)
    if args.vision_init:
        init_vision_from(model, args.vision_init)
        print(f"vision tower initialised from {args.vision_init}", flush=True)
    t1 = time.time()
    # --oracle-features never uses the tower's features: no stage 1 for them
    probe = ([float("nan")] * 2 if args.oracle_features
             else pretrain_vision_grid(model, cpix, cls, (tcpix, tcls), args, len(colours)))
    vision_s = time.time() - t1
    if args.stage1_out:
        from safetensors.torch import save_file
        os.makedirs(args.stage1_out, exist_ok=True)
        save_file({"vision_tower." + k: v.contiguous() for k, v in
                   model.model.vision_tower.state_dict().items()},
                  os.path.join(args.stage1_out, "model.safetensors"))
    print(f"stage 1 done in {vision_s/60:.1f} min: test cells shape {probe[0]:.4f}, colour "
          f"{probe[1]:.4f} (linear head on each cell's mean patch features)", flush=True)
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    tower.eval()

    # stage 2: a fixed pool of train grids, their frozen-tower features cached, every question
    # each grid allows (grid_data.questions_of_cells)
    rng = random.Random(args.seed + 4)
    ids = sorted(labels)
    grids, qs, ans, gid, kinds, targets = [], [], [], [], [], []
    for g in range(args.train_grids):
        cells = grid_data.sample_cells(rng, ids)
        grids.append([row[c] for c in cells])
        for kind, q, a, t in grid_data.questions_of_cells(cells, labels):
            qs.append(q)
            ans.append(a)
            gid.append(g)
            kinds.append(kind)
            targets.append(t)
    grids = torch.tensor(grids)
    t1 = time.time()
    if args.oracle_features:
        # a diagnostic: each patch's features are fixed random embeddings of its cell, its cell's
        # shape and colour (+ noise), i.e. a perfect tower: how fast does the LM learn the lookup?
        g0 = torch.Generator().manual_seed(args.seed + 6)
        Hv = model.config.vision_config.hidden_size
        emb = [torch.randn(n, Hv, generator=g0) / math.sqrt(3) for n in (4, len(SHAPES), len(colours))]
        pc = patch_cells(n_image)
        c = cls[grids]  # [G, 4, 2]
        cached = emb[0][pc][None] + emb[1][c[:, :, 0]][:, pc] + emb[2][c[:, :, 1]][:, pc]
        cached += 0.3 * torch.randn(cached.shape, generator=g0)
    else:
        with torch.no_grad():
            cached = torch.cat([patch_features(model, compose_pixels(cpix[grids[s:s + 128]]))
                                for s in range(0, len(grids), 128)])
    print(f"stage 2: {len(grids)} train grids ({len(qs)} questions), features cached in "
          f"{time.time()-t1:.0f}s", flush=True)
    test = grid_data.grid_questions("test", args.eval_questions, grid_data.TEST_SEED)
    tpix = compose_pixels(tcpix[torch.tensor([[trow[c] for c in g["cells"]] for g in test])])
    tqs, tans = [g["question"] for g in test], [g["answer"] for g in test]
    tim = list(range(len(test)))
    ev = dict(n_image=n_image, system=GRID_SYSTEM, bs=100)

    per_grid = {}
    for k, g in enumerate(gid):
        per_grid.setdefault(g, []).append(k)
    # one row per grid: --questions-per-row of its questions as chat turns (encode_packed)
    steps_per_epoch = math.ceil(len(grids) / args.batch_size)
    total = int(args.epochs * steps_per_epoch) if not args.bench_steps else args.bench_steps
    groups = [{"params": [p for n, p in model.named_parameters()
                          if not n.startswith("model.vision_tower.")]}]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = cosine_schedule(opt, min(100, total // 10), total)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    tower.eval()
    answer_ids = torch.tensor(tokenizer.convert_tokens_to_ids(answers_vocab))
    cell_attn = (CellAttention(model, args.attn_layer % args.layers, args.attn_heads)
                 if args.attn_weight else None)
    pool_attn = (CellAttention(model, args.pool_layer % args.layers, args.attn_heads, uniform=True)
                 if args.pool_weight else None)
    # per kind: the last 400 training answers right (1) or not (0)
    seen = {k: collections.deque(maxlen=400) for k in grid_data.KINDS}
    step, t_train, ema = 0, time.time(), None
    for idx in batches([(list(range(len(grids))), None)], args.batch_size, gen):
        if step >= total:
            break
        turns, row_kinds, row_targets = [], [], []
        for g in idx:
            mine = per_grid[g]
            pick = torch.randperm(len(mine), generator=gen)[:args.questions_per_row].tolist()
            turns.append([(qs[mine[j]], ans[mine[j]]) for j in pick])
            row_kinds += [kinds[mine[j]] for j in pick]
            row_targets.append([targets[mine[j]] for j in pick])
        ids_, mask, lab = encode_packed(tokenizer, turns, model.config.image_token_id, n_image,
                                        GRID_SYSTEM)
        aux = []  # the extra losses of this step, as closures over its forward pass
        if cell_attn is not None:
            # the attention loss's queries: per turn, the last prompt token and the response's
            # lead-in ("the answer is"), i.e. every position whose next token is a label but
            # not </s>; each looks at its turn's target cell
            nxt = lab[:, 1:]
            qpos = (nxt != -100) & (nxt != tokenizer.eos_token_id)
            turn = torch.cumsum(F.pad((nxt == tokenizer.eos_token_id)[:, :-1].long(), (1, 0)), 1)
            # (every row has --questions-per-row turns of 4 such positions)
            cols = qpos.nonzero(as_tuple=True)[1].view(len(idx), -1)
            tcell = torch.tensor(row_targets).gather(1, turn.gather(1, cols))
            aux.append(lambda: args.attn_weight * cell_attn.loss(
                ids_, model.config.image_token_id, cols, tcell))
        if pool_attn is not None:
            # the pooling loss's queries: every 4th image slot, each pooling its own cell
            img_pos = (ids_[0] == model.config.image_token_id).nonzero()[:, 0]
            pc = patch_cells(len(img_pos))
            pcols = img_pos[3::4].expand(len(idx), -1)
            pcell = pc[3::4].expand(len(idx), -1)
            aux.append(lambda: args.pool_weight * pool_attn.loss(
                ids_, model.config.image_token_id, pcols, pcell))
        loss, logits = lm_step(model, opt, sched, ids_, mask, lab, cached[torch.tensor(idx)],
                               torch.arange(len(idx)), keep_logits=True, aux=aux or None)
        # teacher-forced accuracy of the answer words (one per turn, in row order) by kind: on
        # grids not seen before while stage 2 is in its first epoch
        tgt = lab[:, 1:]
        sel = torch.isin(tgt, answer_ids)
        for kind, ok in zip(row_kinds, (logits[:, :-1].argmax(-1)[sel] == tgt[sel]).tolist()):
            seen[kind].append(ok)
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        el = time.time() - t_train
        if step % 25 == 0 or step == total:
            acc = " ".join(f"{k} {sum(v) / max(1, len(v)):.2f}" for k, v in seen.items())
            att = f" attn {cell_attn.last:.3f}" if cell_attn is not None else ""
            att += f" pool {pool_attn.last:.3f}" if pool_attn is not None else ""
            print(f"step {step}/{total} loss {ema:.4f}{att} lr {sched.get_last_lr()[0]:.2e} {el:.0f}s "
                  f"train answers (last 400 per kind): {acc}", flush=True)
        if args.eval_every and step % args.eval_every == 0 and not args.oracle_features:
            acc = evaluate(model, tokenizer, tpix, tqs, tans, tim, answers_vocab, limit=500, **ev)
            print(f"  test[:500] acc {acc:.4f}", flush=True)
            tower.eval()
        if el > args.max_minutes * 60:
            print(f"time limit reached at step {step} (schedule not finished)", flush=True)
            total = step
    train_s = time.time() - t_train
    if args.oracle_features:
        print(f"oracle features: {step} steps in {train_s/60:.1f} min (no subject written)")
        return
    if args.bench_steps:
        print(f"{args.bench_steps} steps in {train_s:.1f}s -> {train_s/args.bench_steps:.2f}s/step, "
              f"epoch ~{steps_per_epoch*train_s/args.bench_steps/60:.1f} min")
        return
    acc, acc_type = evaluate(model, tokenizer, tpix, tqs, tans, tim, answers_vocab, by_type=True, **ev)
    acc_blank = evaluate(model, tokenizer, tpix, tqs, tans, tim, answers_vocab, blank=True, **ev)
    kinds = {}
    preds_ok = {}
    for k in grid_data.KINDS:
        sel = [i for i, g in enumerate(test) if g["kind"] == k]
        kinds[k] = round(evaluate(model, tokenizer, tpix[sel], [tqs[i] for i in sel],
                                  [tans[i] for i in sel], list(range(len(sel))), answers_vocab,
                                  **ev), 4)
    counts = {}
    for a in tans:
        counts[a] = counts.get(a, 0) + 1
    major = max(counts, key=counts.get)
    print(f"test accuracy {acc:.4f} (n={len(tqs)}) {acc_type} {kinds}, blank image {acc_blank:.4f}, "
          f"majority '{major}' {counts[major]/len(tans):.4f}, train {train_s/60:.1f} min", flush=True)
    info = {
        "task": "grid", "dataset": "tgvkv.eval dataset 'easy-vqa-grid' (tgvkv.eval.easy_vqa_grid)",
        "test_questions": len(tqs), "test_grids_seed": grid_data.TEST_SEED,
        "test_accuracy": round(acc, 4), "test_accuracy_by_kind": kinds,
        "test_accuracy_by_type": {k: v for k, v in acc_type.items() if k != "yes/no"},
        "test_accuracy_blank_image": round(acc_blank, 4),
        "test_majority_answer": major, "test_majority_share": round(counts[major] / len(tans), 4),
        "vision_pretrain_minutes": round(vision_s / 60, 2),
        "vision_probe_test_cell_shape": round(probe[0], 4),
        "vision_probe_test_cell_colour": round(probe[1], 4),
        "vision_init": os.path.relpath(os.path.abspath(args.vision_init), os.path.dirname(
            os.path.dirname(os.path.abspath(__file__)))) if args.vision_init else None,
        "train_grids": len(grids), "train_questions": len(qs),
        "prompt": prompt_text("<question>", GRID_SYSTEM), "num_image_tokens": n_image,
    }
    save_subject(model, processor, args, info, step, train_s, t0, n_params)


def save_subject(model, processor, args, info, step, train_s, t0, n_params):
    """Write the model, its processor and training_info.json (``info`` + the run's facts)."""
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    full = {
        "trained_with": "scripts/train_tiny_vlm.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("out", "bench_steps")),
        "seed": args.seed, "threads": args.threads, "steps": step,
        "train_minutes": round(train_s / 60, 2), "total_minutes": round((time.time() - t0) / 60, 2),
        "params": n_params, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        # the minutes (and whether --max-minutes cut the schedule) depend on the machine
        "cpu": cpu_model(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "answer_lead": ANSWER_LEAD, "response": f"{ANSWER_LEAD} <answer> </s>",
    }
    full.update(info)
    with open(os.path.join(out, "training_info.json"), "w") as f:
        json.dump(full, f, indent=2)
    print(json.dumps(full, indent=2))


def _seed_everything(args):
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)


# the settings of run 7 (python scripts/train_tiny_vlm.py --task grid), see bench/results/grid_subject_attempts.md
GRID_DEFAULTS = dict(
    out=os.path.join(os.path.dirname(__file__), "..", "src", "tgvkv", "data", "tiny-llava-grid"),
    image_size=2 * IMAGE_SIZE, layers=8, hidden=64, heads=4, kv_heads=2, max_positions=512,
    vision_hidden=128, vision_layers=2, vision_steps=1200, vision_lr=1e-3, train_grids=9600,
    vision_init=os.path.join(os.path.dirname(__file__), "..", "src", "tgvkv", "data",
                             "tiny-llava-easyvqa"),
    epochs=6.5, batch_size=32, questions_per_row=8, lr=2e-3, eval_every=500, eval_questions=500,
    cell_id_weight=1.0, max_minutes=37.0, init_std=0.08, attn_weight=1.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "src", "tgvkv", "data", "tiny-llava-easyvqa"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=2.2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--open-weight", type=int, default=3,
                    help="repeat each non-yes/no question this many times per epoch")
    ap.add_argument("--balance-yes-no", type=int, default=0,
                    help="1: repeat the rarer answer of each kind of yes/no question (see repeats())")
    ap.add_argument("--plain-first", type=float, default=0.3,
                    help="share of stage-2 steps trained without the negated yes/no questions")
    ap.add_argument("--flips", type=int, default=1,
                    help="1: stage 2 sees each image randomly flipped (frozen tower only)")
    ap.add_argument("--synthetic-yes-no", type=int, default=1,
                    help="1: add yes/no questions made from the train image labels (synthetic_yes_no())")
    ap.add_argument("--tie-embeddings", type=int, default=0, help="1: tie the LM's input and output embeddings")
    ap.add_argument("--synthetic-true", type=int, default=3,
                    help="extra synthetic questions per image about its own colour and shape")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--vision-epochs", type=int, default=30,
                    help="stage 1: epochs of vision-tower pretraining as a shape/colour classifier")
    ap.add_argument("--vision-lr", type=float, default=2e-3, help="stage 1 learning rate")
    ap.add_argument("--vision-lr-scale", type=float, default=0.0,
                    help="stage 2: vision tower LR as a fraction of --lr (0: frozen, features cached)")
    ap.add_argument("--max-minutes", type=float, default=28.0, help="stop training after this long")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--bench-steps", type=int, default=0, help="only time this many steps")
    g = ap.add_argument_group("the grid subject (--task grid; its defaults: GRID_DEFAULTS)")
    g.add_argument("--task", choices=("easy-vqa", "grid"), default="easy-vqa",
                   help="easy-vqa: the first subject; grid: 2x2 grids of easy-VQA images")
    g.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    g.add_argument("--heads", type=int, default=4, help="LM query heads")
    g.add_argument("--kv-heads", type=int, default=2, help="LM KV heads (GQA)")
    g.add_argument("--max-positions", type=int, default=256)
    g.add_argument("--vision-steps", type=int, default=0,
                   help="grid stage 1: steps (32 random train grids each)")
    g.add_argument("--train-grids", type=int, default=0, help="grid stage 2: fixed train grids")
    g.add_argument("--vision-init", default="",
                   help="grid stage 1: start the tower from this LLaVA folder's (init_vision_from)")
    g.add_argument("--cell-id-weight", type=float, default=0.0,
                   help="grid stage 1: weight of a per-patch loss predicting the patch's cell")
    g.add_argument("--vision-objective", choices=("cell", "patch"), default="cell",
                   help="grid stage 1: classify each cell's mean patch features, or every patch")
    g.add_argument("--questions-per-row", type=int, default=1,
                   help="grid stage 2: questions about one grid per training row (chat turns)")
    g.add_argument("--head-dim", type=int, default=0, help="LM head size (0: hidden / heads)")
    g.add_argument("--rope-theta", type=float, default=10000.0, help="LM RoPE base")
    g.add_argument("--oracle-features", action="store_true",
                   help="grid, a diagnostic: stage 2 on perfect patch features (random embeddings "
                        "of each patch's cell, shape and colour); nothing is written")
    g.add_argument("--init-std", type=float, default=0.0,
                   help="grid: std of the LM / projector / LM-head weights at init (0: transformers')")
    g.add_argument("--attn-weight", type=float, default=0.0,
                   help="grid: weight of the attention loss (CellAttention: one layer's first "
                        "--attn-heads heads look at the asked cell from the end of the question "
                        "and the answer's lead-in; 0: none)")
    g.add_argument("--attn-layer", type=int, default=3, help="grid: the attention loss's layer")
    g.add_argument("--attn-heads", type=int, default=2,
                   help="grid: the attention and pooling losses' heads")
    g.add_argument("--pool-weight", type=float, default=0.0,
                   help="grid: weight of the pooling loss (CellAttention, uniform: one layer's "
                        "first --attn-heads heads spread each image slot's attention over its "
                        "own cell, so that later layers see cell-level features; 0: none)")
    g.add_argument("--pool-layer", type=int, default=1, help="grid: the pooling loss's layer")
    g.add_argument("--stage1-out", default="",
                   help="grid: also save the stage-1 tower here (a --vision-init for later runs)")
    g.add_argument("--eval-questions", type=int, default=0,
                   help="grid: test questions evaluated (the first 500 are 'easy-vqa-grid')")
    argv = sys.argv[1:]
    if ap.parse_known_args(argv)[0].task == "grid":
        ap.set_defaults(**GRID_DEFAULTS)
    args = ap.parse_args(argv)
    if args.task == "grid":
        _seed_everything(args)
        return main_grid(args)
    if args.synthetic_yes_no and not args.vision_epochs:
        ap.error("--synthetic-yes-no 1 needs the stage-1 image labels (--vision-epochs > 0)")

    _seed_everything(args)
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
    if args.vision_epochs:
        colours = [a for a in answers_vocab if a not in SHAPES + ("yes", "no")]
        shape, colour = image_labels(qs, ans, img_ids, len(pix), colours)
        test_labels = (tpix,) + image_labels(tqs, tans, timg, len(tpix), colours)
        print(f"stage 1: labelled train images: shape {(shape >= 0).float().mean():.3f}, "
              f"colour {(colour >= 0).float().mean():.3f}", flush=True)
        t1 = time.time()
        probe = pretrain_vision(model, pix, shape, colour, test_labels, args, len(colours))
        vision_s = time.time() - t1
        print(f"stage 1 done in {vision_s/60:.1f} min: test shape {probe[0]:.4f}, "
              f"colour {probe[1]:.4f} (linear head on mean patch features)", flush=True)
    else:
        probe, vision_s = (None, None), 0.0
    frozen = args.vision_lr_scale == 0.0
    tower = model.model.vision_tower
    if frozen:  # stage 2 never changes the tower: compute its features once
        tower.requires_grad_(False)
        tower.eval()
        with torch.no_grad():
            # [4, n_images, 64, Hv]: as is, flipped left-right, up-down, both (--flips)
            variants = [(), (3,), (2,), (2, 3)][:4 if args.flips else 1]
            cached = torch.stack([
                torch.cat([patch_features(model, pix[s:s + 250].flip(d) if d else pix[s:s + 250])
                           for s in range(0, len(pix), 250)]) for d in variants])
    if args.synthetic_yes_no:
        sq, sa, si = synthetic_yes_no(qs, ans, shape, colour, colours,
                                      torch.Generator().manual_seed(args.seed + 2),
                                      args.synthetic_true)
        print(f"stage 2: {len(sq)} synthetic yes/no questions from the train image labels", flush=True)
        qs, ans, img_ids = list(qs) + sq, list(ans) + sa, list(img_ids) + si
    pool = [i for i, r in enumerate(repeats(qs, ans, args.open_weight, args.balance_yes_no))
            for _ in range(r)]
    steps_per_epoch = math.ceil(len(pool) / args.batch_size)
    total = int(args.epochs * steps_per_epoch) if not args.bench_steps else args.bench_steps
    # curriculum: the first --plain-first share of the steps without the negated yes/no questions
    # (see batches())
    plain = [i for i in pool if ans[i] not in ("yes", "no") or not yes_no_group(qs[i])[1]]
    switch = int(args.plain_first * total)
    warmup = min(200, total // 10)
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]}]
    if not frozen:
        groups.append({"params": list(tower.parameters()), "lr": args.lr * args.vision_lr_scale})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = cosine_schedule(opt, warmup, total)
    gen = torch.Generator().manual_seed(args.seed)
    all_img = torch.tensor(img_ids)
    model.train()
    step, t_train, ema = 0, time.time(), None
    # Batches are uniformly shuffled questions (one epoch = every question once). Grouping the
    # questions of a few images per batch (cheaper vision tower) kept the model stuck on the
    # text-only prior: too few images per step for the vision tower to learn.
    for idx in batches([(plain, switch), (pool, None)], args.batch_size, gen):
        if step >= total:
            break
        ids, mask, lab = encode_batch(tokenizer, [qs[i] for i in idx], [ans[i] for i in idx],
                                      model.config.image_token_id)
        uniq, img_index = torch.unique(all_img[idx], return_inverse=True)
        if frozen:  # a random flip of each image (the answers do not change)
            feats = cached[torch.randint(len(cached), (len(uniq),), generator=gen), uniq]
        else:
            feats = patch_features(model, pix[uniq])
        loss = lm_step(model, opt, sched, ids, mask, lab, feats, img_index)
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        el = time.time() - t_train
        if step % 50 == 0 or step == total:
            print(f"step {step}/{total} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} {el:.0f}s", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            acc, acc_type = evaluate(model, tokenizer, tpix, tqs, tans, timg, answers_vocab,
                                     limit=1000, by_type=True)
            print(f"  test[:1000] acc {acc:.4f} {acc_type}", flush=True)
        if el > args.max_minutes * 60:
            print(f"time limit reached at step {step} (schedule not finished)", flush=True)
            total = step
    train_s = time.time() - t_train
    if args.bench_steps:
        print(f"{args.bench_steps} steps in {train_s:.1f}s -> {train_s/args.bench_steps:.2f}s/step, "
              f"epoch ~{steps_per_epoch*train_s/args.bench_steps/60:.1f} min")
        return
    acc, acc_type = evaluate(model, tokenizer, tpix, tqs, tans, timg, answers_vocab, by_type=True)
    acc_blank = evaluate(model, tokenizer, tpix, tqs, tans, timg, answers_vocab, blank=True)
    yes_no = sum(a in ("yes", "no") for a in tans) / len(tans)
    print(f"test accuracy {acc:.4f} (n={len(tqs)}) {acc_type}, blank image {acc_blank:.4f}, "
          f"train {train_s/60:.1f} min", flush=True)

    info = {
        "test_questions": len(tqs), "test_accuracy": round(acc, 4),
        "test_accuracy_by_type": acc_type,
        "test_accuracy_blank_image": round(acc_blank, 4),
        "vision_pretrain_minutes": round(vision_s / 60, 2),
        "vision_probe_test_shape": None if probe[0] is None else round(probe[0], 4),
        "vision_probe_test_colour": None if probe[1] is None else round(probe[1], 4),
        "test_majority_yes_no_share": round(yes_no, 4),
        "prompt": prompt_text("<question>"), "num_image_tokens": NUM_IMAGE_TOKENS,
    }
    save_subject(model, processor, args, info, step, train_s, t0, n_params)


if __name__ == "__main__":
    main()
