"""easy-VQA grids: 2x2 grids of easy-VQA images and questions about one cell of the grid.

Each cell of a grid is one easy-VQA image (64x64, one shape in one colour), so a grid is a 128x128
image; the question picks one cell, by position ("what shape is in the top left?") or by attribute
("what color is the triangle?"), so *which part of the image matters is decided by the question*:
the setting of TGV-KV (text-grounded eviction), unlike single-object easy-VQA where every image
token says the same thing.

Kinds of question (:data:`KINDS`), drawn uniformly; answers are easy-VQA's own answer words:

- ``position_shape``: "what shape is in the {position}?" -> circle / rectangle / triangle
- ``position_color``: "what color is the shape in the {position}?" -> one of the 8 colours
- ``shape_color``: "what color is the {shape}?" (a shape found in exactly one cell) -> colour
- ``color_shape``: "which shape is {colour}?" (a colour found in exactly one cell) -> shape

Positions (:data:`POSITIONS`): cell 0 top left, 1 top right, 2 bottom left, 3 bottom right.

Cells of a split's grids come from that split only (train grids from easy-VQA's train images,
test grids from its test images), four distinct images per grid, each image's shape and colour
read off the split's own question/answer pairs (:func:`image_labels`; images whose shape or
colour no question tells are not used). Everything is drawn from ``random.Random(seed)``: the
same seed gives the same grids and questions.
"""

from __future__ import annotations

import random

__all__ = ["SHAPES", "POSITIONS", "KINDS", "CELL_SIZE", "GRID_SIZE", "TEST_SEED",
           "TEST_QUESTIONS", "image_labels", "yes_no_group", "split_labels", "colours",
           "sample_cells", "question_of", "questions_of_cells", "grid_questions",
           "patch_cells", "compose_grid"]

SHAPES = ("circle", "rectangle", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
KINDS = ("position_shape", "position_color", "shape_color", "color_shape")
CELL_SIZE = 64  # easy-VQA images are 64x64
GRID_SIZE = 2 * CELL_SIZE
TEST_SEED = 14  # the built-in "easy-vqa-grid" test subset
TEST_QUESTIONS = 500


def colours():
    """The 8 colour words of easy-VQA's answers, in the package's order."""
    import easy_vqa

    return [a for a in easy_vqa.get_answers() if a not in SHAPES + ("yes", "no")]


def yes_no_group(question):
    """(attribute, negated) of a yes/no question: ("colour", False) for "is there a red shape?"."""
    words = question.replace("?", " ").split()
    return ("shape" if any(w in SHAPES for w in words) else "colour",
            "not" in words or "no" in words)


def image_labels(questions, answers, image_ids, n_images, colour_words):
    """Per-image shape and colour class as two int64 tensors (-1 where no question tells it).

    Read off the split's own question/answer pairs: "what shape ...? circle", "what color ...?
    red", "what color is the circle?" (names the shape), and yes/no questions whose statement is
    true ("is there a red shape?" yes, "is there not a circle?" no).
    """
    import torch

    shape = [-1] * n_images
    colour = [-1] * n_images
    for q, a, i in zip(questions, answers, image_ids):
        words = q.replace("?", " ").split()
        if a in SHAPES:
            shape[i] = SHAPES.index(a)
        elif a in colour_words:
            colour[i] = colour_words.index(a)
        elif (a == "yes") != yes_no_group(q)[1]:  # a yes/no question whose statement holds
            for w in words:
                if w in SHAPES:
                    shape[i] = SHAPES.index(w)
                elif w in colour_words:
                    colour[i] = colour_words.index(w)
        if a not in ("yes", "no") and "color" in words:
            for w in words:  # "what color is the triangle?"
                if w in SHAPES:
                    shape[i] = SHAPES.index(w)
    return torch.tensor(shape), torch.tensor(colour)


def split_labels(split):
    """(image paths, {image id: (shape word, colour word)}) of the labelled images of an easy-VQA
    split ("train" or "test"): the images whose shape and colour the split's questions tell."""
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the easy-vqa-grid dataset needs the `easy-vqa` package: "
                          "pip install 'tgvkv[eval]' (or pip install easy-vqa)") from e
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    qs, ans, ids = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    cw = colours()
    shape, colour = image_labels(qs, ans, ids, max(paths) + 1, cw)
    labels = {i: (SHAPES[int(shape[i])], cw[int(colour[i])]) for i in sorted(paths)
              if shape[i] >= 0 and colour[i] >= 0}
    return paths, labels


def sample_cells(rng, image_ids):
    """Four distinct image ids from ``image_ids`` (a sorted list), cell 0..3."""
    return rng.sample(image_ids, 4)


def question_of(kind, cells, labels, rng):
    """(question, answer, target cell) of one ``kind`` about the grid ``cells``, or None when the
    grid has no cell that kind can pick (no shape / colour found in exactly one cell)."""
    shapes = [labels[c][0] for c in cells]
    cols = [labels[c][1] for c in cells]
    if kind == "position_shape":
        t = rng.randrange(4)
        return f"what shape is in the {POSITIONS[t]}?", shapes[t], t
    if kind == "position_color":
        t = rng.randrange(4)
        return f"what color is the shape in the {POSITIONS[t]}?", cols[t], t
    if kind == "shape_color":
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if not unique:
            return None
        s = unique[rng.randrange(len(unique))]
        t = shapes.index(s)
        return f"what color is the {s}?", cols[t], t
    if kind == "color_shape":
        unique = sorted({c for c in cols if cols.count(c) == 1})
        if not unique:
            return None
        c = unique[rng.randrange(len(unique))]
        t = cols.index(c)
        return f"which shape is {c}?", shapes[t], t
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")


def questions_of_cells(cells, labels):
    """Every question one grid allows (each position for the two position kinds, each unique
    shape / colour for the attribute kinds): a list of (kind, question, answer, target cell)."""
    shapes = [labels[c][0] for c in cells]
    cols = [labels[c][1] for c in cells]
    out = []
    for t, p in enumerate(POSITIONS):
        out.append(("position_shape", f"what shape is in the {p}?", shapes[t], t))
        out.append(("position_color", f"what color is the shape in the {p}?", cols[t], t))
    for s in SHAPES:
        if shapes.count(s) == 1:
            t = shapes.index(s)
            out.append(("shape_color", f"what color is the {s}?", cols[t], t))
    for c in sorted(set(cols)):
        if cols.count(c) == 1:
            t = cols.index(c)
            out.append(("color_shape", f"which shape is {c}?", shapes[t], t))
    return out


def grid_questions(split, n, seed):
    """``n`` questions, each on its own grid of four images of ``split``: a list of dicts
    ``{"cells": [4 image ids], "kind", "question", "answer", "target"}``.

    Per question: a kind drawn uniformly from :data:`KINDS`, then four distinct labelled images,
    redrawn until the kind can pick a cell (the attribute kinds need a shape / colour found in
    exactly one cell), then the picked cell.
    """
    _, labels = split_labels(split)
    ids = sorted(labels)
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kind = KINDS[rng.randrange(len(KINDS))]
        while True:
            cells = sample_cells(rng, ids)
            qa = question_of(kind, cells, labels, rng)
            if qa is not None:
                break
        q, a, t = qa
        out.append({"cells": cells, "kind": kind, "question": q, "answer": a, "target": t})
    return out


def patch_cells(n_patches):
    """[n_patches] the grid cell (0..3, :data:`POSITIONS` order) of each image patch of a grid,
    patches in raster order (as CLIP's tower emits them; a square number of patches)."""
    import torch

    side = int(round(n_patches ** 0.5))
    if side * side != n_patches or side % 2:
        raise ValueError(f"patch_cells: {n_patches} patches are not an even square grid")
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return ((r // (side // 2)) * 2 + c // (side // 2)).reshape(-1)


def compose_grid(images):
    """The 2x2 grid (a 128x128 RGB PIL image) of four 64x64 images, cells in :data:`POSITIONS`
    order."""
    from PIL import Image

    grid = Image.new("RGB", (GRID_SIZE, GRID_SIZE))
    for k, im in enumerate(images):
        im = im.convert("RGB")
        if im.size != (CELL_SIZE, CELL_SIZE):
            im = im.resize((CELL_SIZE, CELL_SIZE))
        grid.paste(im, ((k % 2) * CELL_SIZE, (k // 2) * CELL_SIZE))
    return grid


def load_grid_samples(split="test", n=TEST_QUESTIONS, seed=TEST_SEED):
    """Harness samples (see :mod:`tgvkv.eval.datasets`) of :func:`grid_questions`: the composed
    grid as ``image``, one reference answer, exact match; ``cells``/``kind``/``target`` kept."""
    from PIL import Image

    paths, _ = split_labels(split)
    out = []
    cache = {}
    for k, g in enumerate(grid_questions(split, n, seed)):
        ims = []
        for c in g["cells"]:
            if c not in cache:
                with Image.open(paths[c]) as im:
                    cache[c] = im.convert("RGB")
            ims.append(cache[c])
        out.append({"id": f"easy-vqa-grid-{split}-{seed}-{k}", "image": compose_grid(ims),
                    "question": g["question"], "answers": [g["answer"]], "metric": "exact_match",
                    "cells": list(g["cells"]), "kind": g["kind"], "target": g["target"],
                    "split": split})
    return out
