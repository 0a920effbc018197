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

# ---- the VQA answer normalisation, exactly as lmms-eval's EvalAIAnswerProcessor -----------
# (the VQA challenge's processor as lmms-eval ships it, quirks included, so that our numbers are
# comparable with lmms-eval's: tests/test_eval_metrics.py holds cases computed with lmms-eval 0.7.3
# and compares with it directly when it is installed). Keys with capitals ("Im", "Ive", "Id've")
# of the original table can never match after lowercasing and are left out.
_CONTRACTIONS = dict(kv.split("=") for kv in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've""".split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
# "(?!<=\d)" is a lookahead, not the lookbehind it looks like, and at most 32 periods go: both as
# in the processor (its re.sub passes re.UNICODE where the count goes)
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)


def normalize_answer(s: str) -> str:
    """The VQA answer normalisation of lmms-eval (``EvalAIAnswerProcessor``): lowercase, drop
    commas and question marks, split "'s", punctuation, periods, number words, articles,
    contractions, whitespace."""
    s = str(s).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    out = s
    for p in _PUNCT:  # a mark next to a space is dropped, elsewhere it becomes a space
        out = out.replace(p, "" if (p + " " in s or " " + p in s) else " ")
    out = _PERIOD_STRIP.sub("", out, _PERIOD_COUNT)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


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
