"""Quality metrics of `dyrate eval`: captions (CIDEr-D, BLEU-4, ROUGE-L, object F1), VQA accuracy and
exact match, POPE accuracy / precision / recall / F1 / yes-ratio.

Definitions (docs/eval.md has the long form):

- Captions: pycocoevalcap's scorers on text tokenised by its Stanford PTB tokenizer (Java), with
  the punctuation tokens removed, exactly as the COCO caption evaluation does. A whole set is
  scored in one call, so CIDEr-D's document frequencies come from that set's references.
- VQA: the answer normalisation of the official VQA evaluation (written here from its documented
  rules) and accuracy `min(#references equal to the answer / min(3, #references), 1)`; with ten
  references this is the usual `min(#humans / 3, 1)` (without the official average over the ten
  leave-one-out subsets), with one reference it is exact match after normalisation.
- POPE: the first word of the answer decides: `yes`, `no`, anything else is "unknown" (wrong,
  and not a yes).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
from typing import Hashable, Iterable, Mapping, Sequence

# ---------------------------------------------------------------- VQA answer normalisation

# Punctuation the official VQA evaluation strips (the apostrophe and the period are handled apart).
VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})

# Canonical English contractions. Each one written with any of its apostrophes left out maps back
# to it ("dont" -> "don't", "couldnt've" -> "couldn't've"): the official script's contraction table
# is this rule spelled out.
CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't it'd it'd've it'll it's let's "
    "ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't "
    "she'd she'd've she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll "
    "somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd we'd've we'll we're we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for word in CONTRACTIONS:
        parts = word.split("'")
        n = len(parts) - 1
        for keep in itertools.product((True, False), repeat=n):
            if all(keep):
                continue
            variant = parts[0] + "".join(("'" if k else "") + p for k, p in zip(keep, parts[1:]))
            # A variant that is an ordinary word ("well", "hell", "its", "were", "ill", ...) stays as it is.
            if variant and variant not in _ORDINARY_WORDS:
                table.setdefault(variant, word)
    return table


# Apostrophe-less forms that are ordinary words themselves are left alone.
_ORDINARY_WORDS = frozenset("hell id ill its lets shed shell wed well were".split())
VQA_CONTRACTIONS = _contraction_table()

_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_DECIMAL = re.compile(r"(?<!\d)\.|\.(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation, in its order:

    1. newlines and tabs become spaces; outer whitespace is stripped;
    2. punctuation: each mark of VQA_PUNCTUATION is deleted where it touches a space (or anywhere,
       when the answer holds a comma between digits, "1,000"), and replaced by a space elsewhere
       ("black-and-white" -> "black and white"); a period is deleted unless it is a decimal point
       between digits ("2.5" stays);
    3. words (split on whitespace, lower-cased): number words zero..ten (and "none") become digits,
       the articles a / an / the are dropped, contractions written without their apostrophes get
       them back ("dont" -> "don't"); the words are joined by single spaces.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    digits_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in VQA_PUNCTUATION:
        if p not in text:
            continue
        if digits_comma or (p + " ") in text or (" " + p) in text:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w in ARTICLES:
            continue
        words.append(VQA_CONTRACTIONS.get(w, w))
    return " ".join(words)


def _strip_answer(text: str) -> str:
    """Lower-case, single spaces, no surrounding punctuation: the form exact match compares."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """min(#references equal to the prediction / min(3, #references), 1), both sides normalised
    with `normalize_vqa_answer`. No references: 0."""
    if not references:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    matches = sum(normalize_vqa_answer(r) == pred for r in references)
    return min(matches / min(3, len(references)), 1.0)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the answer equals one of the references after lower-casing, collapsing whitespace and
    stripping surrounding punctuation (no other normalisation: "2" does not match "two")."""
    pred = _strip_answer(prediction)
    return float(any(_strip_answer(r) == pred for r in references))


def vqa_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], types: Sequence[str | None] | None = None
) -> dict:
    """Mean VQA accuracy and exact match over a set (x100 is the usual percentage), per type too."""
    n = len(predictions)
    acc = [vqa_accuracy(p, r) for p, r in zip(predictions, references)]
    em = [exact_match(p, r) for p, r in zip(predictions, references)]
    out: dict = {"accuracy": sum(acc) / n if n else None, "exact_match": sum(em) / n if n else None}
    if types is not None and any(t is not None for t in types):
        by_type: dict[str, list[float]] = {}
        for t, a in zip(types, acc):
            by_type.setdefault(str(t), []).append(a)
        out["accuracy_by_type"] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
    return out


# ---------------------------------------------------------------- POPE

_FIRST_WORD = re.compile(r"[a-z]+")


def pope_answer(text: str) -> str | None:
    """'yes' or 'no' from the first word of a free-text answer ('Yes, there is.' -> 'yes'); None otherwise."""
    m = _FIRST_WORD.search(text.lower())
    word = m.group(0) if m else ""
    return word if word in ("yes", "no") else None


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE's numbers with 'yes' as the positive class. An answer whose first word is neither yes nor
    no is "unknown": wrong for accuracy, and a negative prediction for precision / recall."""
    pred = [pope_answer(p) for p in predictions]
    gold = [label.strip().lower() for label in labels]
    n = len(pred)
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gold))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(pred, gold))
    tn = sum(p == "no" and g == "no" for p, g in zip(pred, gold))
    n_yes = tp + fp
    precision = tp / n_yes if n_yes else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else None,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": n_yes / n if n else None,
        "unknown_ratio": sum(p is None for p in pred) / n if n else None,
        "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "unknown": sum(p is None for p in pred)},
    }


# ---------------------------------------------------------------- captions


class JavaMissing(RuntimeError):
    """pycocoevalcap's PTB tokenizer needs a `java` on PATH."""


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTB tokenisation (Stanford CoreNLP 3.4.1 PTBTokenizer, lower-cased, one line per
    caption, its punctuation tokens removed), in one Java call. Same output as
    `pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer().tokenize`, but the temporary file goes to the
    system temp directory (not the package folder) and Java's chatter to stderr is kept quiet."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    if shutil.which("java") is None:
        raise JavaMissing("java is not on PATH: the caption metrics need pycocoevalcap's PTB tokenizer (Java)")
    keys = [k for k, caps in captions.items() for _ in caps]
    # One caption per line: every whitespace run (newlines included) becomes one space.
    lines = [" ".join(str(c).split()) for caps in captions.values() for c in caps]
    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(lines))
        name = f.name
    try:
        cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", name]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    finally:
        os.remove(name)
    if proc.returncode != 0:
        raise RuntimeError(
            f"PTB tokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()[:500]}"
        )
    out_lines = proc.stdout.decode("utf-8").split("\n")
    result: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, out_lines + [""] * (len(keys) - len(out_lines))):
        result[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return result


def score_tokenized(
    references: Mapping[Hashable, list[str]], predictions: Mapping[Hashable, list[str]]
) -> dict[str, float]:
    """CIDEr-D (pycocoevalcap's `Cider`: n=4, sigma=6, clipped counts, length penalty), BLEU-4
    (corpus BLEU, 'closest' reference length) and ROUGE-L (beta 1.2, mean over captions) of
    already PTB-tokenised text, keyed alike, one prediction per key."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not references:
        return {"CIDEr": None, "BLEU-4": None, "ROUGE-L": None}
    gts = {k: list(references[k]) for k in references}
    res = {k: list(predictions[k]) for k in references}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"CIDEr": float(cider), "BLEU-4": float(bleu[3]), "ROUGE-L": float(rouge)}


def caption_metrics(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """Score one caption set in one call: {'CIDEr', 'BLEU-4', 'ROUGE-L'} over the keys of `references`
    (every key needs a prediction). Raises JavaMissing without Java."""
    many = caption_metrics_many({"_": predictions}, references)
    return many["_"]


def caption_metrics_many(
    predictions: Mapping[str, Mapping[Hashable, str]], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Caption metrics of several prediction sets (one per policy) over the same references, with one
    tokenizer call for everything. Each set is scored on the reference keys it has predictions for;
    CIDEr-D's document frequencies come from those references."""
    batch: dict[Hashable, Sequence[str]] = {("ref", k): v for k, v in references.items()}
    for name, preds in predictions.items():
        for k, v in preds.items():
            batch[("pred", name, k)] = [v]
    tok = ptb_tokenize(batch)
    out = {}
    for name, preds in predictions.items():
        keys = [k for k in references if k in preds]
        out[name] = score_tokenized({k: tok[("ref", k)] for k in keys}, {k: tok[("pred", name, k)] for k in keys})
    return out


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


__all__ = [
    "JavaMissing",
    "caption_metrics",
    "caption_metrics_many",
    "exact_match",
    "normalize_vqa_answer",
    "pope_answer",
    "pope_metrics",
    "ptb_tokenize",
    "score_tokenized",
    "vqa_accuracy",
    "vqa_metrics",
]
