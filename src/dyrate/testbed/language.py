"""Text of the testbed: captions, short-answer questions, POPE questions, and the caption parser.

Everything is computed from a `Scene` spec, so answers can be recomputed and checked. All text
is lower-case, with punctuation written as in ordinary prose ("a red circle, a blue square.");
the word-level tokenizer splits punctuation off and its decoder glues it back, so a decoded
answer can equal a reference string exactly.

Captions are *content-first*: the first response word already depends on the image (a count
word, a size word or a position), so the last prompt token has a reason to look at the image
(a prototype whose captions all began with "a" made FastV's probe meaningless).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .scenes import COLOUR_NAMES, POSITIONS, SHAPES, SIZES, Scene, SceneObject, category_prior

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
BACKGROUND_WORDS = {"plain": "plain", "noise": "noisy", "gradient": "shaded", "stripes": "striped", "dots": "dotted"}

# Caption prompt -> style. Each image has one reference per style (5 references, as in COCO).
CAPTION_PROMPTS: dict[str, str] = {
    "count": "describe the image.",
    "there": "what is in the image?",
    "list": "list the objects in the image.",
    "grid": "describe where the shapes are.",
    "background": "describe the scene in detail.",
}
DEFAULT_CAPTION_STYLE = "count"
QA_TYPES = ("colour", "count", "position", "shape", "size")
POPE_SPLITS = ("random", "popular", "adversarial")


_PUNCT_SPACE = re.compile(r" ([,.:?;])")


def prose(text: str) -> str:
    """'a red circle , a blue square .' -> 'a red circle, a blue square.'"""
    return _PUNCT_SPACE.sub(r"\1", text)


def _prep(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def object_phrase(obj: SceneObject, article: bool = True) -> str:
    """'a large red circle at the top-left' (or without the article)."""
    head = f"{obj.size} {obj.colour} {obj.shape} {_prep(obj.position)}"
    return f"a {head}" if article else head


def _join(parts: list[str], last: str = " and ") -> str:
    if len(parts) == 1:
        return parts[0]
    return " , ".join(parts[:-1]) + last + parts[-1]


def caption(scene: Scene, style: str = DEFAULT_CAPTION_STYLE) -> str:
    """One caption of the scene in a named style (see CAPTION_PROMPTS)."""
    return prose(_caption(scene, style))


def _caption(scene: Scene, style: str) -> str:
    objs = list(scene.objects)  # reading order
    n = len(objs)
    noun = "object" if n == 1 else "objects"
    listed = _join([object_phrase(o) for o in objs])
    if style == "count":
        return f"{NUMBERS[n]} {noun} : {listed} ."
    if style == "there":
        verb = "is" if n == 1 else "are"
        return f"there {verb} {NUMBERS[n]} {noun} : {listed} ."
    if style == "list":
        return " , ".join(object_phrase(o, article=False) for o in objs) + " ."
    if style == "grid":
        return " , ".join(f"{o.position} : {o.size} {o.colour} {o.shape}" for o in objs) + " ."
    if style == "background":
        shapes = "shape" if n == 1 else "shapes"
        return f"{NUMBERS[n]} {shapes} on a {BACKGROUND_WORDS[scene.background]} background : {listed} ."
    raise ValueError(f"unknown caption style {style!r}; known: {', '.join(CAPTION_PROMPTS)}")


def captions(scene: Scene) -> list[str]:
    """All reference captions of a scene, one per style."""
    return [caption(scene, s) for s in CAPTION_PROMPTS]


# ---------------------------------------------------------------- short-answer questions


@dataclass(frozen=True)
class Question:
    type: str  # one of QA_TYPES, or "pope"
    question: str
    answer: str


def _refer(obj: SceneObject, scene: Scene, exclude: str) -> str:
    """Shortest unique description of `obj` that does not name attribute `exclude`
    ('colour', 'shape', 'size' or 'position')."""
    others = [o for o in scene.objects if o is not obj]
    candidates = []
    if exclude != "colour":
        candidates.append(((obj.colour, obj.shape), lambda o: (o.colour, o.shape) == (obj.colour, obj.shape), f"{obj.colour} {obj.shape}"))
    if exclude not in ("colour", "size"):
        candidates.append(((obj.size, obj.colour, obj.shape), lambda o: o.key[:3] == obj.key[:3], f"{obj.size} {obj.colour} {obj.shape}"))
    if exclude != "shape":
        candidates.insert(0, (obj.shape, lambda o: o.shape == obj.shape, obj.shape))
    for _, same, text in candidates:
        if not any(same(o) for o in others):
            return f"the {text}"
    if exclude != "position":  # a position always identifies one object
        noun = obj.shape if exclude != "shape" else "object"
        return f"the {noun} {_prep(obj.position)}"
    raise AssertionError("unreachable: position is only excluded for where-questions of unique objects")


def question_of_type(scene: Scene, qtype: str, rng: random.Random) -> Question | None:
    """One short-answer question of a type, or None if the scene has no such question."""
    q = _question_of_type(scene, qtype, rng)
    return None if q is None else Question(q.type, prose(q.question), q.answer)


def _question_of_type(scene: Scene, qtype: str, rng: random.Random) -> Question | None:
    objs = list(scene.objects)
    if qtype == "colour":
        obj = rng.choice(objs)
        if rng.random() < 0.3:
            return Question("colour", f"what colour is the object {_prep(obj.position)} ?", obj.colour)
        return Question("colour", f"what colour is {_refer(obj, scene, 'colour')} ?", obj.colour)
    if qtype == "shape":
        obj = rng.choice(objs)
        return Question("shape", f"which shape is {_prep(obj.position)} ?", obj.shape)
    if qtype == "size":
        obj = rng.choice(objs)
        return Question("size", f"is {_refer(obj, scene, 'size')} small or large ?", obj.size)
    if qtype == "position":
        # Only objects that can be named without their position.
        nameable = [o for o in objs if sum(p.key[:3] == o.key[:3] for p in objs) == 1]
        if not nameable:
            return None
        obj = rng.choice(nameable)
        return Question("position", f"where is {_refer(obj, scene, 'position')} ?", obj.position)
    if qtype == "count":
        kind = rng.choice(["all", "shape", "colour"])
        if kind == "all":
            return Question("count", "how many objects are there ?", NUMBERS[len(objs)])
        if kind == "shape":
            shape = rng.choice(objs).shape if rng.random() < 0.7 else rng.choice(SHAPES)
            n = sum(o.shape == shape for o in objs)
            return Question("count", f"how many {PLURALS[shape]} are there ?", NUMBERS[n])
        colour = rng.choice(objs).colour if rng.random() < 0.7 else rng.choice(COLOUR_NAMES)
        n = sum(o.colour == colour for o in objs)
        return Question("count", f"how many {colour} objects are there ?", NUMBERS[n])
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QA_TYPES)}")


def short_questions(scene: Scene, seed: int | None = None) -> list[Question]:
    """One question of each type that applies to the scene (deterministic from the seed)."""
    rng = random.Random(scene.seed * 7919 + 1 if seed is None else seed)
    out = [question_of_type(scene, t, rng) for t in QA_TYPES]
    return [q for q in out if q is not None]


def question_type(question: str) -> str | None:
    """The type of a testbed question ('colour', 'count', 'position', 'shape', 'size' or 'pope')
    read off its words; None for anything else (caption prompts)."""
    w = words_of(question)
    if w[:2] == ["how", "many"]:
        return "count"
    if w[:2] == ["is", "there"]:
        return "pope"
    if w[:1] == ["is"] and "small" in w and "large" in w:
        return "size"
    return {("where", "is"): "position", ("what", "colour"): "colour", ("which", "shape"): "shape"}.get(tuple(w[:2]))


def named_objects(scene: Scene, question: str) -> list[SceneObject]:
    """The objects a short-answer or POPE question is about, from the scene spec: the one object
    it names (colour, position, shape, size questions), every object counted (possibly none), the
    objects of the POPE category (none for an absent one); [] for a caption prompt."""
    words = [w for w in words_of(question) if w != "?"]
    objs = list(scene.objects)
    qtype = question_type(question)

    def find(words_: list[str]) -> list[SceneObject]:
        pos = next((w for w in words_ if w in POSITIONS), None)
        return [
            o
            for o in objs
            if (pos is None or o.position == pos)
            and all(w not in SHAPES or o.shape == w for w in words_)
            and all(w not in COLOUR_NAMES or o.colour == w for w in words_)
            and all(w not in SIZES or o.size == w for w in words_)
        ]

    if qtype == "count":
        if words[2] == "objects":
            return objs
        if words[2] in COLOUR_NAMES:
            return [o for o in objs if o.colour == words[2]]
        shape = next(s for s, p in PLURALS.items() if p == words[2])
        return [o for o in objs if o.shape == shape]
    if qtype == "pope":
        return [o for o in objs if o.category == (words[3], words[4])]
    if qtype == "size":
        return find([w for w in words if w not in SIZES])
    if qtype in ("colour", "position", "shape"):
        return find(words[2:] if qtype == "colour" else words)
    return []


def answer(scene: Scene, q: Question) -> str:
    """Recompute the answer of a generated question from the scene spec (used by tests)."""
    objs = named_objects(scene, q.question)
    if q.type == "count":
        return NUMBERS[len(objs)]
    if q.type == "pope":
        return "yes" if objs else "no"
    (obj,) = objs
    return {"colour": obj.colour, "shape": obj.shape, "position": obj.position, "size": obj.size}[q.type]


# ---------------------------------------------------------------- POPE


def pope_question(colour: str, shape: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"is there {article} {colour} {shape} in the image?"


def _popularity_order() -> list[tuple[str, str]]:
    prior = category_prior()
    return sorted(prior, key=lambda c: (-prior[c], c))


def pope_questions(scene: Scene, split: str, per_image: int = 3) -> list[tuple[str, str]]:
    """POPE-style (question, 'yes'|'no') pairs, half yes, as in the POPE benchmark.

    Positives: up to `per_image` distinct (colour, shape) categories of the scene (the same
    ones in every split). Negatives, as many, absent from the scene:
      random      - uniformly drawn absent categories;
      popular     - the most frequent categories of the dataset (highest prior);
      adversarial - categories most similar to present ones: same shape in another colour
                    first, then same colour with another shape (ties by popularity).
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; known: {', '.join(POPE_SPLITS)}")
    rng = random.Random(scene.seed * 104729 + 17)
    present = sorted({o.category for o in scene.objects})
    positives = rng.sample(present, min(per_image, len(present)))
    absent = [c for c in _popularity_order() if c not in present]
    k = len(positives)
    neg_rng = random.Random(scene.seed * 104729 + 17 + POPE_SPLITS.index(split))
    if split == "random":
        negatives = neg_rng.sample(absent, k)
    elif split == "popular":
        negatives = absent[:k]
    else:
        shapes = {s for _, s in present}
        colours = {c for c, _ in present}
        scored = sorted(absent, key=lambda c: (0 if c[1] in shapes else 1 if c[0] in colours else 2, absent.index(c)))
        negatives = scored[:k]
    pairs = [(pope_question(*c), "yes") for c in positives] + [(pope_question(*c), "no") for c in negatives]
    neg_rng.shuffle(pairs)
    return pairs


# ---------------------------------------------------------------- caption parsing and scoring

_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*|[^\sa-z]")
_SINGULAR = {p: s for s, p in PLURALS.items()}
_SEPARATORS = {",", ".", ";", "and"}


def words_of(text: str) -> list[str]:
    """Lower-cased words with punctuation split off ('top-left' stays one word)."""
    return _WORD.findall(text.lower())


ParsedObject = tuple[str | None, str | None, str | None, str | None]


def parse_caption(text: str) -> set[ParsedObject]:
    """Objects named in a caption, as (size, colour, shape, position) tuples.

    Works on every caption style and on imperfect model output: the text is cut into clauses at
    ',', '.', ';' and 'and'; each shape word in a clause makes one object, which takes the
    size, colour and position words of its clause (words before the next shape word; a
    position said before the first shape, as in 'top-left : large red circle', counts too).
    Attributes not mentioned are None.
    """
    clauses: list[list[str]] = [[]]
    for w in words_of(text):
        if w in _SEPARATORS:
            clauses.append([])
        else:
            clauses[-1].append(_SINGULAR.get(w, w))
    objects: set[ParsedObject] = set()
    for clause in clauses:
        shape_at = [i for i, w in enumerate(clause) if w in SHAPES]
        for j, i in enumerate(shape_at):
            start = shape_at[j - 1] + 1 if j > 0 else 0
            end = shape_at[j + 1] if j + 1 < len(shape_at) else len(clause)
            before, after = clause[start:i], clause[i + 1 : end]
            size = next((w for w in reversed(before) if w in SIZES), None)
            colour = next((w for w in reversed(before) if w in COLOUR_NAMES), None)
            position = next((w for w in after if w in POSITIONS), None)
            if position is None:
                position = next((w for w in reversed(before) if w in POSITIONS), None)
            objects.add((size, colour, clause[i], position))
    return objects


def scene_objects(scene: Scene) -> set[ParsedObject]:
    """The ground-truth objects of a scene in the parser's format."""
    return {o.key for o in scene.objects}


def object_f1(predicted: set, gold: set) -> dict[str, float]:
    """Precision, recall and F1 of exact (size, colour, shape, position) matches.
    Two empty sets score 1.0."""
    if not predicted and not gold:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    tp = len(set(predicted) & set(gold))
    p = tp / len(predicted) if predicted else 0.0
    r = tp / len(gold) if gold else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1}


def attribute_accuracy(predicted: set, gold: set) -> dict[str, float]:
    """Per-attribute accuracy over gold objects, matching predicted objects by position
    (each position holds at most one object). Missing objects count as wrong."""
    by_pos = {p[3]: p for p in predicted if p[3] is not None}
    out = {}
    for k, name in enumerate(("size", "colour", "shape")):
        hits = sum(1 for g in gold if g[3] in by_pos and by_pos[g[3]][k] == g[k])
        out[name] = hits / len(gold) if gold else 1.0
    out["count"] = float(len(gold) == len(predicted))
    return out
