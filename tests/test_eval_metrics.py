"""Metric functions of `dyrate eval` against hand-computed cases and direct pycocoevalcap calls."""

from __future__ import annotations

import shutil

import pytest

from dyrate.evaluation import metrics as M


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two", "2"),
        ("  the Dog.\n", "dog"),
        ("A red circle", "red circle"),
        ("an apple", "apple"),
        ("none", "0"),
        ("ten", "10"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("couldnt've", "couldn't've"),
        ("well", "well"),  # an ordinary word, not "we'll"
        ("its red", "its red"),
        ("black-and-white", "black and white"),  # punctuation inside a word becomes a space
        ("yes!", "yes"),  # punctuation touching the end is deleted
        ("red , blue", "red blue"),  # touching a space: deleted
        ("1,000", "1000"),  # a comma between digits: every mark is deleted
        ("2.5", "2.5"),  # decimal point kept
        ("end.", "end"),
        ("(left)", "left"),
        ("Yes", "yes"),
    ],
)
def test_vqa_normalisation(text, expected):
    assert M.normalize_vqa_answer(text) == expected


def test_vqa_accuracy_rule():
    ten = ["2"] * 2 + ["two"] * 1 + ["3"] * 7  # "2" appears 3 times after normalisation
    assert M.vqa_accuracy("two", ten) == 1.0
    assert M.vqa_accuracy("3", ten) == 1.0
    assert M.vqa_accuracy("4", ten) == 0.0
    assert M.vqa_accuracy("yes", ["yes", "no", "no", "no", "no", "no", "no", "no", "no", "no"]) == pytest.approx(1 / 3)
    assert M.vqa_accuracy("Yes.", ["yes", "yes", "no"]) == pytest.approx(2 / 3)
    # One reference: exact match after normalisation.
    assert M.vqa_accuracy("The Three.", ["three"]) == 1.0
    assert M.vqa_accuracy("three objects", ["three"]) == 0.0
    assert M.vqa_accuracy("x", []) == 0.0


def test_exact_match_is_stricter():
    assert M.exact_match(" Three. ", ["three"]) == 1.0
    assert M.exact_match("3", ["three"]) == 0.0  # no number normalisation
    assert M.exact_match("the cat", ["cat"]) == 0.0
    out = M.vqa_metrics(["3", "red", "x"], [["three"], ["red"], ["blue"]], ["count", "colour", "colour"])
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["exact_match"] == pytest.approx(1 / 3)
    assert out["accuracy_by_type"] == {"colour": 0.5, "count": 1.0}


def test_pope_counts():
    assert M.pope_answer("Yes, there is a cat.") == "yes"
    assert M.pope_answer("no") == "no"
    assert M.pope_answer("  No.") == "no"
    assert M.pope_answer("There is no cat") is None
    assert M.pope_answer("") is None
    preds = ["yes", "yes", "no", "no", "yes", "maybe", "No", "yes."]
    gold = ["yes", "no", "yes", "no", "yes", "yes", "no", "no"]
    out = M.pope_metrics(preds, gold)
    # tp: 0,4  fp: 1,7  fn: 2,5(unknown)  tn: 3,6
    assert out["counts"] == {"tp": 2, "fp": 2, "tn": 2, "fn": 2, "unknown": 1}
    assert out["accuracy"] == pytest.approx(4 / 8)
    assert out["precision"] == pytest.approx(2 / 4)
    assert out["recall"] == pytest.approx(2 / 4)
    assert out["f1"] == pytest.approx(0.5)
    assert out["yes_ratio"] == pytest.approx(4 / 8)
    assert out["unknown_ratio"] == pytest.approx(1 / 8)
    perfect = M.pope_metrics(["yes", "no"], ["yes", "no"])
    assert perfect["accuracy"] == perfect["f1"] == 1.0


REFS = {
    1: ["A red circle at the top-left.", "there is one red circle", "one object: a large red circle, top-left."],
    2: ["Two squares: a blue square and a green square.", "two squares", "a blue and a green square"],
    3: ["three objects: a star, a cross and a circle.", "a yellow star, a purple cross, a red circle"],
}
PREDS = {1: "a red circle at the top-left.", 2: "two blue squares", 3: ""}


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_caption_metrics_equal_direct_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": PREDS[k]}] for k in REFS})
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)

    ours = M.caption_metrics(PREDS, REFS)
    assert ours["CIDEr"] == pytest.approx(cider, abs=1e-12)
    assert ours["BLEU-4"] == pytest.approx(bleu[3], abs=1e-12)
    assert ours["ROUGE-L"] == pytest.approx(rouge, abs=1e-12)
    assert ours["CIDEr"] > 0

    # Several policies in one tokenizer call score as they would alone.
    other = {1: "one red circle", 2: "two squares", 3: "a star"}
    many = M.caption_metrics_many({"a": PREDS, "b": other}, REFS)
    assert many["a"] == ours
    assert many["b"] == M.caption_metrics(other, REFS)
    # A perfect copy of a reference beats a near miss.
    assert M.caption_metrics({k: v[0] for k, v in REFS.items()}, REFS)["CIDEr"] > ours["CIDEr"]


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_ptb_tokenize_keeps_lines_apart():
    out = M.ptb_tokenize({"a": ["Hello,  World!\nagain", ""], "b": ["It's 2.5 in total."]})
    assert out == {"a": ["hello world again", ""], "b": ["it 's 2.5 in total"]}


def test_object_metrics():
    from dyrate.testbed.language import scene_objects
    from dyrate.testbed.scenes import sample_scene

    scene = sample_scene(5)
    gold = scene_objects(scene)
    from dyrate.testbed.language import caption

    from dyrate.testbed.scoring import object_metrics

    perfect = object_metrics([(caption(scene), gold)])
    assert perfect == {"object_precision": 1.0, "object_recall": 1.0, "object_f1": 1.0}
    empty = object_metrics([("nothing here", gold)])
    assert empty["object_f1"] == 0.0
    both = object_metrics([(caption(scene), gold), ("nothing here", gold)])
    assert both["object_f1"] == pytest.approx(0.5)
