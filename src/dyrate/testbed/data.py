"""Training examples and evaluation files of the testbed.

Training draws an endless, deterministic stream: example i of step s is a pure function of
(seed, s, i), so a resumed run sees exactly the batches it would have seen.
Evaluation sets (`write_dataset`) use scene seeds from another range, so they are held out.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import language as L
from .scenes import Scene, category_prior, render, sample_scene

# Scene seeds: evaluation set S uses EVAL_BASE + S * SPAN + i, training seed T uses
# TRAIN_BASE + T * TRAIN_SPAN + step * batch + i. The ranges never meet for S, T < 1000.
EVAL_BASE, SPAN = 0, 1_000_000
TRAIN_BASE, TRAIN_SPAN = 2_000_000_000, 1_000_000_000

# Task mixture of training (probabilities). "dialog" (several questions about one image in one
# multi-turn example, see `dialog_turns`) is optional and off unless named in --task-weights.
TASK_WEIGHTS = {"caption": 0.4, "qa": 0.4, "pope": 0.2}
OPTIONAL_TASKS = ("dialog",)


def eval_scene_seed(seed: int, i: int) -> int:
    return EVAL_BASE + seed * SPAN + i


def train_scene_seed(seed: int, step: int, batch_size: int, i: int) -> int:
    return TRAIN_BASE + seed * TRAIN_SPAN + step * batch_size + i


@dataclass(frozen=True)
class Example:
    scene: Scene
    task: str  # caption / qa / pope / dialog
    question: str
    answer: str
    more: tuple[tuple[str, str], ...] = ()  # later (question, answer) turns of a dialog


def sample_example(scene_seed: int, task_weights: dict[str, float] | None = None) -> Example:
    """One (scene, question, answer) training example, deterministic from the scene seed (and the
    task mixture, TASK_WEIGHTS unless given)."""
    weights = TASK_WEIGHTS if task_weights is None else {t: w for t, w in task_weights.items() if w > 0}
    scene = sample_scene(scene_seed)
    rng = random.Random(scene_seed ^ 0x5EED)
    task = rng.choices(list(weights), weights=list(weights.values()))[0]
    if task == "dialog":
        (question, ans), *more = dialog_turns(scene, rng)
        return Example(scene, task, question, ans, tuple(more))
    if task == "caption":
        style = rng.choice(list(L.CAPTION_PROMPTS))
        return Example(scene, task, L.CAPTION_PROMPTS[style], L.caption(scene, style))
    if task == "qa":
        for _ in range(10):
            q = L.question_of_type(scene, rng.choice(L.QA_TYPES), rng)
            if q is not None:
                return Example(scene, task, q.question, q.answer)
        raise AssertionError("every scene has colour/count/shape/size questions")
    split = rng.choice(L.POPE_SPLITS)
    question, ans = rng.choice(L.pope_questions(scene, split))
    return Example(scene, task, question, ans)


def binding_negatives(scene: Scene) -> list[tuple[str, str]]:
    """Absent (colour, shape) categories whose colour and shape both occur in the scene, on
    different objects ('a purple cross' beside a purple square and a green cross): only binding
    colour to shape answers them, so checking colours or shapes alone cannot."""
    present = {o.category for o in scene.objects}
    colours = sorted({o.colour for o in scene.objects})
    shapes = sorted({o.shape for o in scene.objects})
    return [(c, s) for c in colours for s in shapes if (c, s) not in present]


def dialog_turns(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Several (question, answer) turns about one scene, in random order: one short-answer
    question of every type that applies, one POPE positive and one POPE negative (a binding
    negative if the scene has one, else a random absent category). One image pass then trains
    up to seven lookups, each needing the object named by the question."""
    turns = [(q.question, q.answer) for t in L.QA_TYPES if (q := L.question_of_type(scene, t, rng)) is not None]
    present = sorted({o.category for o in scene.objects})
    turns.append((L.pope_question(*rng.choice(present)), "yes"))
    hard = binding_negatives(scene)
    absent = hard or [c for c in sorted(category_prior()) if c not in present]
    turns.append((L.pope_question(*rng.choice(absent)), "no"))
    rng.shuffle(turns)
    return turns


# ---------------------------------------------------------------- evaluation files


DATASET_FILES = ("captions.json", "vqa.jsonl", "scenes.jsonl", *(f"pope_{s}.jsonl" for s in L.POPE_SPLITS))


def write_dataset(out: Path, seed: int, n: int, image_size: int = 96, progress: bool = True) -> dict[str, int]:
    """Write a held-out evaluation set of `n` scenes to `out` (see `dyrate testbed data --help`).
    Returns the number of records per file."""
    from tqdm import tqdm

    from ..errors import InputError

    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} is a file, not a folder")
        others = sorted(p.name for p in out.iterdir() if p.name not in (*DATASET_FILES, "images"))
        if others:
            raise InputError(f"--out {out} holds files that are not a testbed dataset ({', '.join(others[:3])}); "
                             "give an empty or new folder")
    # Written whole into a sibling folder first, then swapped in: an interrupted run leaves the old
    # dataset as it was, and a dataset written over an old one keeps none of its images.
    final, out = out, out.with_name(out.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    images, annotations, vqa, scenes = [], [], [], []
    pope: dict[str, list[dict]] = {s: [] for s in L.POPE_SPLITS}
    ann_id = 0
    for i in tqdm(range(n), desc="scenes", disable=not progress or n < 200, unit="img"):
        scene = sample_scene(eval_scene_seed(seed, i))
        name = f"{i:06d}.png"
        render(scene, image_size).save(out / "images" / name)
        image_id = i
        images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size})
        for cap in L.captions(scene):
            annotations.append({"id": ann_id, "image_id": image_id, "caption": cap})
            ann_id += 1
        for k, q in enumerate(L.short_questions(scene)):
            vqa.append(
                {"question_id": image_id * 10 + k, "image": name, "question": q.question, "answers": [q.answer], "type": q.type}
            )
        for split in L.POPE_SPLITS:
            for k, (question, label) in enumerate(L.pope_questions(scene, split)):
                pope[split].append({"question_id": image_id * 10 + k, "image": name, "text": question, "label": label})
        scenes.append({"image_id": image_id, "image": name, **scene.to_json()})

    coco = {
        "info": {"description": f"dyrate testbed scenes, seed {seed}", "version": "1"},
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": annotations,
    }
    (out / "captions.json").write_text(json.dumps(coco))
    _write_jsonl(out / "vqa.jsonl", vqa)
    for split, rows in pope.items():
        _write_jsonl(out / f"pope_{split}.jsonl", rows)
    _write_jsonl(out / "scenes.jsonl", scenes)
    if final.exists():
        shutil.rmtree(final / "images", ignore_errors=True)
        for name in DATASET_FILES:
            (final / name).unlink(missing_ok=True)
        for item in out.iterdir():
            item.rename(final / item.name)
        out.rmdir()
    else:
        out.rename(final)
    counts = {"images": len(images), "captions": len(annotations), "vqa": len(vqa), "scenes": len(scenes)}
    counts.update({f"pope_{s}": len(r) for s, r in pope.items()})
    return counts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_task_weights(text: str) -> dict[str, float]:
    """'caption=0.2,qa=0.5,pope=0.3' -> {task: weight}; every task of TASK_WEIGHTS must be named,
    an OPTIONAL_TASKS one ('dialog=0.5') may be."""
    from ..errors import InputError

    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, eq, value = item.partition("=")
        try:
            out[name.strip()] = float(value) if eq else float("nan")
        except ValueError:
            raise InputError(f"--task-weights {text!r}: {item!r} is not TASK=WEIGHT") from None
    named_ok = set(TASK_WEIGHTS) <= set(out) <= set(TASK_WEIGHTS) | set(OPTIONAL_TASKS)
    if not named_ok or any(not w >= 0 for w in out.values()) or sum(out.values()) <= 0:
        raise InputError(f"--task-weights {text!r}: give a weight >= 0 for each of {', '.join(TASK_WEIGHTS)} "
                         f"(optionally {', '.join(OPTIONAL_TASKS)}), e.g. caption=0.2,qa=0.5,pope=0.3")
    return {t: out[t] for t in (*TASK_WEIGHTS, *OPTIONAL_TASKS) if t in out}


def predictor_samples(image_size: int, n: int, seed: int = 0) -> list:
    """n procedurally generated (image, question, answer) training samples for a rate predictor, at
    `image_size`, from a seed range the VLM's training does not use."""
    from ..learn import Sample

    out = []
    for i in range(n):
        ex = sample_example(train_scene_seed(100 + seed, 0, 1, i))
        out.append(Sample(render(ex.scene, image_size), ex.question, ex.answer))
    return out
