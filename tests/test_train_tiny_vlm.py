"""scripts/train_tiny_vlm.py: the labels and extra questions it derives from the easy-VQA train split.

The committed tiny VLM is trained on them, so a wrong label here is a wrong training signal: every
derived label must agree with every question/answer pair of the split that mentions the image.
"""

import importlib.util
import os

import pytest
import torch

# one xdist worker runs this module (its module/session fixture is built once)
pytestmark = pytest.mark.xdist_group("train_tiny")


easy_vqa = pytest.importorskip("easy_vqa")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "train_tiny_vlm.py")

@pytest.fixture(scope="module")
def T():
    if not os.path.exists(SCRIPT):
        pytest.skip(f"{SCRIPT} not in this checkout")
    spec = importlib.util.spec_from_file_location("train_tiny_vlm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

@pytest.fixture(scope="module")
def train(T):
    qs, ans, ids = easy_vqa.get_train_questions()
    colours = [a for a in easy_vqa.get_answers() if a not in T.SHAPES + ("yes", "no")]
    shape, colour = T.image_labels(qs, ans, ids, max(ids) + 1, colours)
    return qs, ans, ids, colours, shape, colour

def _answer_from_labels(T, q, shape, colour, colours):
    """The answer a question must have given the image's labels (None: not derivable)."""
    words = q.replace("?", " ").split()
    named = [w for w in words if w in colours or w in T.SHAPES]
    if len(named) != 1 or shape < 0 or colour < 0:
        return None
    truth = colours[colour] if named[0] in colours else T.SHAPES[shape]
    if q.startswith("what"):
        return None
    return "yes" if (named[0] == truth) != T.yes_no_group(q)[1] else "no"

def test_image_labels_agree_with_every_train_question(T, train):
    qs, ans, ids, colours, shape, colour = train
    assert len(colours) == 8
    assert (shape >= 0).float().mean() > 0.9 and (colour >= 0).float().mean() > 0.85
    checked = 0
    for q, a, i in zip(qs, ans, ids):
        s, c = int(shape[i]), int(colour[i])
        if a in T.SHAPES:
            assert s == T.SHAPES.index(a), (q, a, i)
        elif a in colours:
            assert c == colours.index(a), (q, a, i)
        else:
            want = _answer_from_labels(T, q, s, c, colours)
            if want is not None:
                assert want == a, (q, a, i, s, c)
                checked += 1
    n_yes_no = sum(a in ("yes", "no") for a in ans)
    assert checked > 0.8 * n_yes_no  # most yes/no questions are checked, not skipped

def test_synthetic_questions_follow_the_labels(T, train):
    qs, ans, ids, colours, shape, colour = train
    sq, sa, si = T.synthetic_yes_no(qs, ans, shape, colour, colours,
                                    torch.Generator().manual_seed(0), extra_true=2)
    known = int(((shape >= 0) & (colour >= 0)).sum())
    assert len(sq) == known * (8 + 3 + 2 * 2)
    real = set(qs)
    assert set(sq) <= real | set(easy_vqa.get_test_questions()[0])  # only the split's own phrasings
    for q, a, i in zip(sq, sa, si):
        assert _answer_from_labels(T, q, int(shape[i]), int(colour[i]), colours) == a, (q, a, i)
    assert 0.3 < sa.count("yes") / len(sa) < 0.7
    # deterministic for a fixed generator
    assert T.synthetic_yes_no(qs, ans, shape, colour, colours, torch.Generator().manual_seed(0),
                              extra_true=2)[0] == sq

def test_repeats(T):
    qs = ["is there a red shape?", "is there a red shape?", "is there a red shape?",
          "what color is the shape?", "is there not a circle?"]
    ans = ["no", "no", "yes", "red", "yes"]
    assert T.repeats(qs, ans, 3, False) == [1, 1, 1, 3, 1]
    assert T.repeats(qs, ans, 3, True) == [1, 1, 2, 3, 1]
    assert T.yes_no_group("is there not a circle?") == ("shape", True)
    assert T.yes_no_group("is no red shape present?") == ("colour", True)
    assert T.yes_no_group("does the image contain a teal shape?") == ("colour", False)


def test_grid_rows_start_with_the_test_prompt(T):
    """--task grid packs several questions about one grid as chat turns: the first turn is the
    exact single-question prompt of the test, and every answer (only the answers) is a label."""
    words = (list(T.TEMPLATE_WORDS) + T.GRID_WORDS + easy_vqa.get_answers()
             + T.GRID_SYSTEM.split() + [w for p in T.grid_data.POSITIONS for w in p.split()])
    tok = T.build_tokenizer(words, 512)
    img = tok.convert_tokens_to_ids("<image>")
    turns = [[("what color is the triangle?", "red"), ("which shape is blue?", "circle")],
             [("what shape is in the top left?", "circle")]]
    ids, mask, lab = T.encode_packed(tok, turns, img, 256, T.GRID_SYSTEM)
    for row, qa in enumerate(turns):
        one, _, one_lab = T.encode_batch(tok, [qa[0][0]], [qa[0][1]], img, 256, T.GRID_SYSTEM)
        n = one.shape[1]
        assert torch.equal(ids[row, :n], one[0]) and torch.equal(lab[row, :n], one_lab[0])
        said = tok.decode([int(t) for t in lab[row] if t >= 0])
        assert said.split() == " ".join(f"the answer is {a} </s>" for _, a in qa).split()
        assert int((ids[row] == img).sum()) == 256
    assert mask.sum(1).tolist()[1] < mask.shape[1]  # the shorter row is padded
    assert T.patch_cells(256).reshape(16, 16)[0, 8].item() == 1  # top right cell
    assert T.patch_cells(256).reshape(16, 16)[15, 0].item() == 2  # bottom left cell


@pytest.mark.parametrize("attn_weight", ["0", "1"])
def test_grid_oracle_diagnostic_runs_and_reports_per_kind(T, monkeypatch, capsys, tmp_path,
                                                          attn_weight):
    """--oracle-features (stage 2 on perfect patch features, a diagnostic) trains a few steps,
    logs the teacher-forced answer accuracy of every question kind, and writes nothing; with
    the attention loss (--attn-weight 1) it logs that loss too, and it falls."""
    out = tmp_path / "subject"
    monkeypatch.setattr("sys.argv", [
        SCRIPT, "--task", "grid", "--out", str(out), "--vision-init", "", "--vision-steps", "0",
        "--oracle-features", "--train-grids", "8", "--batch-size", "4", "--epochs", "25",
        "--layers", "2", "--attn-layer", "1", "--questions-per-row", "2", "--init-std", "0.08",
        "--threads", "1", "--attn-weight", attn_weight])
    T.main()
    log = capsys.readouterr().out
    line = [l for l in log.splitlines() if l.startswith("step 50/50 ")][0]
    first = [l for l in log.splitlines() if l.startswith("step 25/50 ")][0]
    if attn_weight == "1":
        att = [float(l.split(" attn ")[1].split()[0]) for l in (first, line)]
        assert 0 < att[1] < att[0], (first, line)
    else:
        assert " attn " not in log
    accs = {k: float(line.split(k + " ")[1].split()[0]) for k in T.grid_data.KINDS}
    assert all(0.0 <= a <= 1.0 for a in accs.values()) and len(accs) == 4
    assert sum(accs.values()) > 0, line  # some answers right (argmax of the answer word)
    assert float(line.split(" loss ")[1].split()[0]) < float(first.split(" loss ")[1].split()[0])
    assert "oracle features: 50 steps" in log and not out.exists()


def test_cell_attention_loss_is_the_models_own_attention_mass(T):
    """CellAttention recomputes one layer's attention for a few query rows from its saved input:
    it must equal -log of the mass that the model's own (eager) attention weights put on the
    target cell's image slots, per query and head, averaged."""
    import types

    tok = T.build_tokenizer(list(T.TEMPLATE_WORDS) + ["a", "b"], max_length=128)
    args = types.SimpleNamespace(vision_hidden=32, vision_layers=1, hidden=32, layers=4, heads=4,
                                 kv_heads=2, head_dim=0, max_positions=128, rope_theta=1e4,
                                 tie_embeddings=0, image_size=64)
    torch.manual_seed(0)
    m = T.build_model(tok, args)
    m.model.language_model.config._attn_implementation = "eager"
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)  # peaked attention: a wrong slot or head shows
    ca = T.CellAttention(m, 2, 3)  # query heads 0-2: KV heads 0, 0, 1
    img, B = m.config.image_token_id, 3
    ids = torch.randint(0, 10, (B, 100))
    ids[ids == img] = 1
    ids[:, 5:69] = img  # 64 image slots: an 8x8 patch grid, 4 cells of 16
    out = m.model.language_model(inputs_embeds=m.get_input_embeddings()(ids),
                                 output_attentions=True)
    cols = torch.tensor([[70, 80, 99], [69, 75, 90], [71, 72, 73]])
    cells = torch.tensor([[0, 1, 3], [2, 2, 0], [3, 1, 2]])
    got = ca.loss(ids, img, cols, cells)
    att, pc = out.attentions[2], T.patch_cells(64)
    ref = torch.stack([-torch.log(att[b, h, cols[b, i], 5:69][pc == cells[b, i]].sum())
                       for b in range(B) for i in range(3) for h in range(3)]).mean()
    assert torch.allclose(got, ref, rtol=1e-5), (got, ref)
    assert ca.saved is None and abs(ca.last - ref.item()) < 1e-4
    with torch.no_grad():  # evaluation forwards keep nothing
        m.model.language_model(inputs_embeds=m.get_input_embeddings()(ids))
    assert ca.saved is None
