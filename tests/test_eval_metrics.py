"""tgvkv.eval.metrics on hand-computed cases (lmms-eval conventions)."""

import pytest

from tgvkv.eval.metrics import (anls, exact_match, extract_answer, normalize_answer,
                                relaxed_accuracy, vqa_accuracy)


def test_normalize_answer():
    assert normalize_answer("  The Red.") == "red"
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("a\ncat") == "cat"
    assert normalize_answer("1,000") == "1000"


def test_extract_answer():
    assert extract_answer("the answer is red") == "red"
    assert extract_answer("The answer is: Yes.") == "Yes"
    assert extract_answer("The answer is Yes.") == "Yes"
    assert extract_answer("Answer: blue\nbecause") == "blue"
    assert extract_answer("triangle") == "triangle"
    assert extract_answer("") == ""


def test_exact_match():
    assert exact_match("Red", ["red"]) == 1.0
    assert exact_match("the red", ["red"]) == 1.0  # articles are dropped
    assert exact_match("reds", ["red"]) == 0.0
    assert exact_match("no", ["yes", "no"]) == 1.0


def test_vqa_accuracy_ten_answers():
    gts = ["red"] * 3 + ["blue"] * 7
    # leave-one-out: for each of the 10 subsets of 9, min(#red / 3, 1)
    # dropping a "red" (3 times): 2 matches -> 2/3; dropping a "blue" (7 times): 3 -> 1
    assert vqa_accuracy("red", gts) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("blue", gts) == pytest.approx(1.0)
    assert vqa_accuracy("green", gts) == 0.0
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", one) == pytest.approx((0 + 9 * (1 / 3)) / 10)


def test_vqa_accuracy_few_answers_is_exact_match():
    assert vqa_accuracy("yes", ["yes"]) == 1.0
    assert vqa_accuracy("no", ["yes"]) == 0.0


def test_anls():
    assert anls("hello", ["hello"]) == 1.0
    assert anls("Hello ", ["hello"]) == 1.0  # case and surrounding spaces ignored
    assert anls("hellp", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5
    assert anls("abc", ["xyz"]) == 0.0  # below the 0.5 threshold
    assert anls("ab", ["abcd", "ab"]) == 1.0  # max over references
    assert anls("abcdef", ["abcxyz"]) == 0.5  # exactly at the threshold counts


def test_relaxed_accuracy():
    assert relaxed_accuracy("104", ["100"]) == 1.0
    assert relaxed_accuracy("105", ["100"]) == 1.0  # 5% inclusive
    assert relaxed_accuracy("106", ["100"]) == 0.0
    assert relaxed_accuracy("12%", ["0.12"]) == 1.0
    assert relaxed_accuracy("0", ["0"]) == 1.0
    assert relaxed_accuracy("0.01", ["0"]) == 0.0
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0
    assert relaxed_accuracy("yes ", ["no"]) == 0.0
