"""Captions, questions and POPE are correct by construction; the caption parser inverts captions."""

import random

import pytest

from dyrate.testbed import language as L
from dyrate.testbed.scenes import category_prior, sample_scene

SEEDS = range(300)


def test_answers_recomputed_from_spec():
    for seed in SEEDS:
        s = sample_scene(seed)
        qs = L.short_questions(s)
        assert {q.type for q in qs} >= {"colour", "count", "shape", "size"}
        for q in qs:
            assert L.answer(s, q) == q.answer, q
            assert len(q.answer.split()) == 1


def test_answers_independent_checks():
    for seed in SEEDS:
        s = sample_scene(seed)
        for q in L.short_questions(s):
            if q.question == "how many objects are there?":
                assert q.answer == L.NUMBERS[len(s.objects)]
            if q.type == "shape" :
                pos = L.words_of(q.question)[-2]
                assert q.answer == next(o.shape for o in s.objects if o.position == pos)
            if q.type == "position":
                assert q.answer in {o.position for o in s.objects}


def test_pope_balanced_and_correct():
    prior = category_prior()
    ranked = sorted(prior, key=lambda c: (-prior[c], c))
    for seed in SEEDS:
        s = sample_scene(seed)
        present = {o.category for o in s.objects}
        positives = None
        for split in L.POPE_SPLITS:
            pairs = L.pope_questions(s, split)
            yes = [q for q, a in pairs if a == "yes"]
            no = [q for q, a in pairs if a == "no"]
            assert len(yes) == len(no) >= 1
            assert positives is None or set(yes) == positives  # same positives in every split
            positives = set(yes)
            for q, a in pairs:
                assert L.answer(s, L.Question("pope", q, a)) == a
            neg = [tuple(L.words_of(q)[3:5]) for q in no]
            assert not set(neg) & present
            if split == "popular":
                assert set(neg) == set([c for c in ranked if c not in present][: len(neg)])
            if split == "adversarial":
                shapes = {sh for _, sh in present}
                # same shape, other colour first: there are always 5 other colours per shape
                assert any(sh in shapes for _, sh in neg)


@pytest.mark.parametrize("style", list(L.CAPTION_PROMPTS))
def test_parse_caption_round_trip(style):
    for seed in SEEDS:
        s = sample_scene(seed)
        assert L.parse_caption(L.caption(s, style)) == L.scene_objects(s)


def test_captions_content_first():
    firsts = {L.words_of(L.caption(sample_scene(seed)))[0] for seed in range(50)}
    assert firsts == {"one", "two", "three", "four", "five"}


def test_parse_caption_imperfect_text():
    objs = L.parse_caption("Two objects: a large red circle at the top-left and small blue squares in the center")
    assert objs == {("large", "red", "circle", "top-left"), ("small", "blue", "square", "center")}
    assert L.parse_caption("a green star") == {(None, "green", "star", None)}
    assert L.parse_caption("nothing here.") == set()


def test_object_f1():
    a = {("large", "red", "circle", "top")}
    b = a | {("small", "blue", "star", "left")}
    assert L.object_f1(b, b)["f1"] == 1.0
    assert L.object_f1(a, b) == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3)}
    assert L.object_f1(set(), b)["f1"] == 0.0
    assert L.object_f1(set(), set())["f1"] == 1.0


def test_question_types_deterministic():
    s = sample_scene(5)
    assert L.short_questions(s) == L.short_questions(s)
    rng1, rng2 = random.Random(1), random.Random(1)
    assert L.question_of_type(s, "count", rng1) == L.question_of_type(s, "count", rng2)


def test_question_type_and_named_objects():
    from dyrate.testbed.scenes import Scene, SceneObject

    red_circle = SceneObject(0, "circle", "red", "large")
    blue_circle = SceneObject(4, "circle", "blue", "small")
    red_star = SceneObject(8, "star", "red", "small")
    s = Scene(0, "plain", (0, 0, 0), (red_circle, blue_circle, red_star))
    cases = {
        "where is the blue circle?": ("position", [blue_circle]),
        "what colour is the star?": ("colour", [red_star]),
        "what colour is the object at the center?": ("colour", [blue_circle]),
        "which shape is at the bottom-right?": ("shape", [red_star]),
        "is the red circle small or large?": ("size", [red_circle]),
        "how many circles are there?": ("count", [red_circle, blue_circle]),
        "how many red objects are there?": ("count", [red_circle, red_star]),
        "how many green objects are there?": ("count", []),
        "how many objects are there?": ("count", [red_circle, blue_circle, red_star]),
        "is there a red star in the image?": ("pope", [red_star]),
        "is there a blue star in the image?": ("pope", []),
        "describe the image.": (None, []),
    }
    for question, (qtype, objs) in cases.items():
        assert L.question_type(question) == qtype, question
        assert L.named_objects(s, question) == objs, question
    # Every generated question is typed as generated.
    for seed in SEEDS:
        for q in L.short_questions(sample_scene(seed)):
            assert L.question_type(q.question) == q.type
