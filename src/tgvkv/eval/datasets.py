"""VQA datasets for the accuracy harness.

A dataset is a list of samples, each a dict::

    {"id": str, "image": PIL.Image.Image | list of them, "question": str,
     "answers": [str, ...], "metric": "exact_match" | "vqa_accuracy" | "anls" | "relaxed_accuracy"}

``metric`` names the sample's primary metric (the "accuracy" column of the result table); the
harness reports every metric anyway.

Built-in names
--------------
``"easy-vqa"``
    The fixed subset of the easy-VQA test split (pip package ``easy-vqa``, offline): every
    ``EASY_VQA_STRIDE``-th question of ``easy_vqa.get_test_questions()`` in file order, i.e.
    question indices ``0, 38, 76, ...`` (255 questions). One
    reference answer each, primary metric exact match.
``"easy-vqa-full"``
    All 9,673 easy-VQA test questions.
``"easy-vqa-grid"``
    500 questions, each on its own 2x2 grid (128x128) of four easy-VQA **test** images, about
    one cell picked by position or attribute ("what shape is in the top left?", "what color is
    the triangle?", "which shape is red?"; answers are easy-VQA answer words): the fixed subset
    :func:`tgvkv.eval.easy_vqa_grid.grid_questions` ``("test", 500, seed=14)`` (kinds drawn
    uniformly, cells redrawn until the kind can pick one; see that module). One reference
    answer each, primary metric exact match. Majority answer: "rectangle", 19.0 %. The subject
    for it is ``tgvkv/data/tiny-llava-grid`` (``scripts/train_tiny_vlm.py --task grid``, train
    grids from the train split only).

Your own data: JSONL + image folder
-----------------------------------
Pass the path of a ``.jsonl`` file. One JSON object per line::

    {"id": "q1", "image": "images/cat.png", "question": "what color is the cat?",
     "answers": ["black", "black", "dark grey", ...], "metric": "vqa_accuracy"}

- ``image``: a path relative to the JSONL file's folder (or absolute); a list of paths for a
  multi-image prompt (all images come before the question).
- ``answers``: a list of reference answers (``"answer": "..."`` is accepted for a single one).
- ``metric`` (optional): the primary metric; default ``vqa_accuracy`` when there are 10 answers
  (or at least 3), else ``exact_match``.
- ``id`` (optional): defaults to the line number.
"""

from __future__ import annotations

import json
import os

__all__ = ["load_dataset", "EASY_VQA_STRIDE", "default_metric"]

EASY_VQA_STRIDE = 38


def default_metric(answers) -> str:
    return "vqa_accuracy" if len(answers) >= 3 else "exact_match"


def _easy_vqa(stride: int):
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the easy-vqa dataset needs the `easy-vqa` package: "
                          "pip install 'tgvkv[eval]' (or pip install easy-vqa)") from e
    from PIL import Image

    qs, ans, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    out = []
    for i in range(0, len(qs), stride):
        out.append({"id": f"easy-vqa-test-{i}", "image_path": paths[ids[i]], "question": qs[i],
                    "answers": [ans[i]], "metric": "exact_match"})
    for s in out:
        with Image.open(s["image_path"]) as im:
            s["image"] = im.convert("RGB")
    return out


def _jsonl(path: str):
    from PIL import Image

    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n + 1}: not valid JSON: {e}") from None
            for key in ("image", "question"):
                if key not in rec:
                    raise ValueError(f"{path}:{n + 1}: missing required field {key!r}")
            answers = rec.get("answers", rec.get("answer"))
            if answers is None:
                raise ValueError(f"{path}:{n + 1}: needs 'answers' (list) or 'answer' (string)")
            if isinstance(answers, str):
                answers = [answers]
            imgs = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
            pil = []
            for p in imgs:
                full = p if os.path.isabs(p) else os.path.join(root, p)
                with Image.open(full) as im:
                    pil.append(im.convert("RGB"))
            metric = rec.get("metric", default_metric(answers))
            from .metrics import METRICS
            if metric not in METRICS:
                raise ValueError(f"{path}:{n + 1}: unknown metric {metric!r}; one of {sorted(METRICS)}")
            out.append({"id": str(rec.get("id", n)), "image": pil[0] if len(pil) == 1 else pil,
                        "question": rec["question"], "answers": [str(a) for a in answers],
                        "metric": metric})
    return out


def load_dataset(dataset="easy-vqa", limit=None):
    """Samples of a built-in dataset name, a JSONL path, or an already built list of samples."""
    if isinstance(dataset, (list, tuple)):
        data = list(dataset)
    elif dataset == "easy-vqa":
        data = _easy_vqa(EASY_VQA_STRIDE)
    elif dataset == "easy-vqa-full":
        data = _easy_vqa(1)
    elif dataset == "easy-vqa-grid":
        from .easy_vqa_grid import load_grid_samples
        data = load_grid_samples("test")
    elif isinstance(dataset, str) and (dataset.endswith(".jsonl") or os.path.isfile(dataset)):
        data = _jsonl(dataset)
    else:
        raise ValueError(f"unknown dataset {dataset!r}: use 'easy-vqa', 'easy-vqa-full', 'easy-vqa-grid' or the "
                         "path of a .jsonl file (see tgvkv.eval.datasets)")
    if limit is not None:
        data = data[: int(limit)]
    return data
