"""VQA metrics as lmms-eval computes them (per sample; the harness averages).

Every function takes the model's prediction (a string, already passed through
:func:`extract_answer`) and the reference answers (a list of strings, one or more) and returns a
float in [0, 1].

- :func:`exact_match`: normalised string equality with any reference (VizWiz/TextVQA-style
  "exact match" after the lmms-eval answer normalisation).
- :func:`vqa_accuracy`: the VQA score ``min(#matching annotators / 3, 1)``, averaged over the
  10 leave-one-out subsets of the 10 human answers (the official VQAv2 / TextVQA / VizWiz formula
  used by lmms-eval). With fewer than 3 references it degrades to :func:`exact_match`.
- :func:`anls`: Average Normalized Levenshtein Similarity (DocVQA): ``1 - dist / max(len)``,
  0 below the 0.5 threshold, max over references; case-insensitive, whitespace-stripped.
- :func:`relaxed_accuracy`: ChartQA's relaxed correctness: numbers match within 5 % relative
  tolerance (a trailing ``%`` is ignored), other strings must match exactly (case-insensitive).
"""

from __future__ import annotations

import re

__all__ = ["normalize_answer", "extract_answer", "exact_match", "vqa_accuracy", "anls",
           "relaxed_accuracy", "METRICS"]

# ---- the standard VQA answer normalisation (EvalAIAnswerProcessor, as in lmms-eval) ----------
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "its": "it's", "lets": "let's", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
    "whats": "what's", "whered": "where'd", "wheres": "where's", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(s: str) -> str:
    """The VQA-challenge normalisation: lowercase, punctuation, number words, articles,
    contractions, whitespace."""
    s = str(s).replace("\n", " ").replace("\t", " ").strip().lower()
    out = s
    for p in _PUNCT:
        if (p + " " in s or " " + p in s) or (re.search(_COMMA_STRIP, s) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for w in out.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


_LEADS = ("the answer is", "answer is", "answer:", "the answer:", "answer :")


def extract_answer(text: str) -> str:
    """The answer part of a generation: first line, without a leading "the answer is" / "answer:"
    (the tiny easy-VQA model always writes "the answer is X"; many chat VLMs do too), without
    a trailing period."""
    t = str(text).strip().split("\n")[0].strip()
    low = t.lower()
    for lead in _LEADS:
        if low.startswith(lead):
            t = t[len(lead):].lstrip(" :").strip()
            break
    return t.rstrip(" .").strip()


def exact_match(pred: str, answers) -> float:
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in answers))


def vqa_accuracy(pred: str, answers) -> float:
    answers = list(answers)
    if len(answers) < 3:
        return exact_match(pred, answers)
    p = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(g == p for g in others) / 3.0))
    return sum(accs) / len(accs)


def _levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: str, answers, threshold: float = 0.5) -> float:
    p = " ".join(str(pred).strip().lower().split())
    best = 0.0
    for a in answers:
        g = " ".join(str(a).strip().lower().split())
        if not g and not p:
            return 1.0
        sim = 1.0 - _levenshtein(p, g) / max(len(p), len(g))
        best = max(best, sim if sim >= threshold else 0.0)
    return best


def _to_float(s: str):
    s = str(s).strip()
    try:
        if s.endswith("%"):
            return float(s.rstrip("%")) / 100.0
        return float(s)
    except ValueError:
        return None


def relaxed_accuracy(pred: str, answers, tolerance: float = 0.05) -> float:
    best = 0.0
    for a in answers:
        pf, af = _to_float(pred), _to_float(a)
        if pf is not None and af is not None:
            ok = (pf == af) if af == 0 else abs(pf - af) / abs(af) <= tolerance
        else:
            ok = str(pred).strip().lower() == str(a).strip().lower()
        best = max(best, float(ok))
    return best


METRICS = {"exact_match": exact_match, "vqa_accuracy": vqa_accuracy, "anls": anls,
           "relaxed_accuracy": relaxed_accuracy}
