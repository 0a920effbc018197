"""The grid subject: the easy-vqa-grid dataset builder and the committed tiny-llava-grid model."""

import json
import os

import pytest
import torch

# one xdist worker runs this module (its module fixtures are built once)
pytestmark = pytest.mark.xdist_group("grid_subject")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

easy_vqa = pytest.importorskip("easy_vqa")
np = pytest.importorskip("numpy")
from PIL import Image  # noqa: E402

from tgvkv.eval import SUBJECTS, load_dataset, load_model, run, subject_path  # noqa: E402
from tgvkv.eval import easy_vqa_grid as G  # noqa: E402

GRID = subject_path("tiny-llava-grid")


def _split(split):
    qs, ans, ids = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    return qs, ans, ids, paths


def _said(split):
    """{image id: set of (kind, answer)} straight from the split's open questions: what the
    easy-VQA data itself says each image shows (independent of G.image_labels)."""
    qs, ans, ids, _ = _split(split)
    out = {}
    for q, a, i in zip(qs, ans, ids):
        if a in G.SHAPES:
            out.setdefault(i, set()).add(("shape", a))
        elif a not in ("yes", "no"):
            out.setdefault(i, set()).add(("color", a))
    return out


@pytest.fixture(scope="module")
def test_samples():
    return load_dataset("easy-vqa-grid")


def test_grid_dataset_is_the_documented_subset(test_samples):
    assert len(test_samples) == G.TEST_QUESTIONS == 500
    assert SUBJECTS["tiny-llava-grid"] == "easy-vqa-grid"
    vocab = set(easy_vqa.get_answers())
    for s in test_samples:
        assert s["image"].size == (128, 128) and s["metric"] == "exact_match"
        assert s["answers"][0] in vocab and s["answers"][0] not in ("yes", "no")
        assert s["split"] == "test" and len(set(s["cells"])) == 4
    assert {s["kind"] for s in test_samples} == set(G.KINDS)
    # deterministic: the same subset again, and the builder's own call equals the dataset's
    again = G.grid_questions("test", 500, G.TEST_SEED)
    assert [(s["cells"], s["question"], s["answers"][0]) for s in test_samples] == \
        [(g["cells"], g["question"], g["answer"]) for g in again]
    other = G.grid_questions("test", 50, G.TEST_SEED + 1)
    assert [g["cells"] for g in other] != [g["cells"] for g in again[:50]]
    # the first n of a longer draw are the subset (training evaluates on a superset of it)
    assert G.grid_questions("test", 600, G.TEST_SEED)[:500] == again


@pytest.mark.parametrize("split", ["train", "test"])
def test_grid_cells_come_from_their_split_and_answers_fit_the_cell(split):
    qs, ans, ids, paths = _split(split)
    said = _said(split)
    grids = G.grid_questions(split, 120, seed=3)
    n_images = max(paths) + 1
    _, labels = G.split_labels(split)
    checked = 0
    for g in grids:
        assert all(0 <= c < n_images for c in g["cells"])
        t, q, a = g["target"], g["question"], g["answer"]
        target = g["cells"][t]
        kind = "shape" if a in G.SHAPES else "color"
        # what the split's own open questions say about the picked cell's image (when they
        # say it: some images are only described by yes/no questions)
        told = {v for k, v in said.get(target, ()) if k == kind}
        if told:
            assert told == {a}, (split, g, told)
            checked += 1
        for c in g["cells"]:  # the labels the builder used agree with the open questions
            for k, v in said.get(c, ()):
                assert labels[c][0 if k == "shape" else 1] == v, (c, k, v)
        assert a == labels[target][0 if kind == "shape" else 1]
        shapes = [labels[c][0] for c in g["cells"]]
        cols = [labels[c][1] for c in g["cells"]]
        named = q.split()[-1].rstrip("?")
        if g["kind"].startswith("position"):
            assert q.endswith(f"in the {G.POSITIONS[t]}?")
        elif g["kind"] == "shape_color":  # the named shape is in the target cell only
            assert shapes.count(named) == 1 and shapes[t] == named
        else:  # color_shape: the named colour is in the target cell only
            assert cols.count(named) == 1 and cols[t] == named
    assert checked > 0.7 * len(grids)
    # the composed image really is the split's images, in position order
    s = G.load_grid_samples(split, 3, seed=3)
    for smp in s:
        grid = np.asarray(smp["image"])
        for k, c in enumerate(smp["cells"]):
            cell = np.asarray(Image.open(paths[c]).convert("RGB"))
            r0, c0 = (k // 2) * 64, (k % 2) * 64
            assert np.array_equal(grid[r0:r0 + 64, c0:c0 + 64], cell)


def test_train_and_test_grids_share_no_image_file():
    tr = set(_split("train")[3].values())
    te = set(_split("test")[3].values())
    assert not tr & te
    assert G.split_labels("train")[0] == _split("train")[3]


@pytest.fixture(scope="module")
def grid_model():
    assert os.path.isdir(GRID), f"the committed grid subject is missing ({GRID})"
    torch.set_num_threads(2)
    return load_model(GRID, "cpu")


def test_grid_subject_shape(grid_model, test_samples):
    model, processor, _ = grid_model
    cfg = model.config
    t = cfg.text_config
    assert cfg.model_type == "llava"
    assert t.num_hidden_layers >= 8
    assert t.num_key_value_heads < t.num_attention_heads  # GQA
    msgs = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": test_samples[0]["question"]}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    x = processor(text=[text], images=[test_samples[0]["image"]], return_tensors="pt")
    ids = x["input_ids"][0]
    is_img = torch.nonzero(ids == cfg.image_token_id)[:, 0]
    assert len(is_img) >= 256 and len(is_img) == cfg.image_seq_length
    assert int(is_img.min()) >= 10  # a system / instruction text before the image
    assert len(ids) - int(is_img.max()) - 1 >= 6  # the question after it
    assert os.path.getsize(os.path.join(GRID, "model.safetensors")) <= 20 * 2**20
    info = json.load(open(os.path.join(GRID, "training_info.json")))
    assert info["test_accuracy"] >= 0.9
    assert info["test_accuracy_blank_image"] <= info["test_majority_share"] + 0.1
    assert info["num_image_tokens"] == len(is_img)


def test_grid_subject_answers_through_generate(grid_model, test_samples):
    """Full cache, through generate(): a handful of the subset, then the same with the image
    blanked (a broken or image-blind model fails one of the two)."""
    samples = test_samples[:32]
    seen = run(model=grid_model, dataset=samples, policies=["full"], keep_ratios=[1.0],
               progress=False, max_new_tokens=8, keep_predictions=True)
    assert all(p.startswith("the answer is ") for p in seen["predictions"]["full"])
    # the committed weights answer 27 of these 32 (90.4% of all 500); image-blind: ~20%
    assert seen["full"]["accuracy"] >= 0.8, seen["predictions"]["full"]
    blank = [dict(s, image=Image.new("RGB", (128, 128), (128, 128, 128))) for s in samples]
    unseen = run(model=grid_model, dataset=blank, policies=["full"], keep_ratios=[1.0],
                 progress=False, max_new_tokens=8)
    assert unseen["full"]["accuracy"] <= 0.5


def test_bench_accuracy_default_subject(tmp_path, capsys, monkeypatch):
    """`tgvkv-bench accuracy` without --model: the default subject (the grid one) on its own
    dataset, the paper's four keep ratios, and the table says which subject it ran; a subject
    whose folder is missing is a clear error."""
    from tgvkv.bench.accuracy import QUICK_SUBJECT
    from tgvkv.bench.cli import main
    from tgvkv.eval import DEFAULT_SUBJECT

    assert QUICK_SUBJECT in SUBJECTS and DEFAULT_SUBJECT == "tiny-llava-grid"
    out = tmp_path / "acc.json"
    rc = main(["accuracy", "--policy", "tgvkv", "--limit", "3", "--max-new-tokens", "6",
               "--threads", "2", "--no-progress", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"subject {DEFAULT_SUBJECT}" in printed and SUBJECTS[DEFAULT_SUBJECT] in printed
    acc = json.loads(out.read_text())["accuracy"]
    assert acc["subject"] == DEFAULT_SUBJECT and acc["dataset"] == SUBJECTS[DEFAULT_SUBJECT]
    assert acc["model"] == subject_path(DEFAULT_SUBJECT) and acc["n_samples"] == 3
    assert acc["keep_ratios"] == [0.5, 0.2, 0.1, 0.05]
    # the argument-less run's accuracy part (--quick) uses the grid subject too and names it
    rc = main(["accuracy", "--quick", "--limit", "2", "--threads", "2", "--no-progress"])
    assert rc == 0 and QUICK_SUBJECT == "tiny-llava-grid"
    assert "subject tiny-llava-grid" in capsys.readouterr().out
    import tgvkv.eval as tgvkv_eval

    monkeypatch.setattr(tgvkv_eval, "subject_path", lambda name: str(tmp_path / "absent" / name))
    rc = main(["accuracy", "--subject", "tiny-llava-grid", "--limit", "1", "--no-progress"])
    assert rc == 2  # a clear user error, not a traceback
    assert "not installed" in capsys.readouterr().err


def _kept_slots_script():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "grid_kept_slots.py")
    spec = importlib.util.spec_from_file_location("grid_kept_slots", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_patch_cell_matches_the_composed_grid(test_samples):
    """The cell of each image slot (G.patch_cells: row-major 8x8 patches, used by training and
    bench/grid_kept_slots.py) is the cell the grid builder pasted there: the patches of cell k
    are exactly the pixels of cell k's image."""
    cell = G.patch_cells(256)
    assert [int((cell == k).sum()) for k in range(4)] == [64] * 4
    with pytest.raises(ValueError, match="patch_cells"):
        G.patch_cells(255)
    paths = easy_vqa.get_test_image_paths()
    s = test_samples[0]
    grid = np.asarray(s["image"])
    patches = grid.reshape(16, 8, 16, 8, 3).transpose(0, 2, 1, 3, 4).reshape(256, 8, 8, 3)
    for k, c in enumerate(s["cells"]):
        img = np.asarray(Image.open(paths[c]).convert("RGB"))
        mine = img.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, 8, 8, 3)
        assert np.array_equal(patches[(cell == k).numpy()], mine)


def test_tgvkv_keeps_no_image_slot_when_the_text_exceeds_the_budget(grid_model, test_samples):
    """The reading of bench/results/accuracy_grid.md: the prompt has 35 text slots; at keep 0.05
    (~15 slots a layer) text priority keeps text only, while random eviction keeps image slots."""
    from tgvkv.eval.harness import _prepare

    mod = _kept_slots_script()
    model, processor, _ = grid_model
    samples = test_samples[:2]
    inputs = _prepare(processor, samples, "cpu")
    n_text = int((inputs[0]["input_ids"][0] != model.config.image_token_id).sum())
    assert n_text == 35
    t = mod.measure(model, samples, inputs, "tgvkv", 0.05)
    assert t["image_slots"] == 0 and t["no_image"] == 1.0
    assert 0 < t["text_slots"] < n_text
    r = mod.measure(model, samples, inputs, "random", 0.05)
    assert r["image_slots"] > 0
    half = mod.measure(model, samples, inputs, "tgvkv", 0.5)
    assert half["text_slots"] > n_text - 2 and half["image_slots"] > 90
    assert 0.0 <= half["in_cell"] <= 1.0
