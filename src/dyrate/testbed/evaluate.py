"""Quality of a testbed checkpoint with plain greedy `model.generate` (no pruning).

Held-out scenes come from `eval_scene_seed(seed, i)`, the same scenes `dyrate testbed data
--seed S` writes. Reported: caption object F1 and per-attribute accuracy (via `parse_caption`),
CIDEr (pycocoevalcap, if Java is available), short-answer accuracy per question type, and
POPE accuracy / F1 / yes-ratio per negative-sampling split. `blank=True` replaces every image
by an empty background, the "is the model looking at the image?" check.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch
from PIL import Image

from . import language as L
from .data import eval_scene_seed
from .processing import build_prompt
from .scenes import Scene, render, sample_scene


def generate(model, processor, images: list[Image.Image], questions: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy answers, batched with left padding."""
    answers = []
    for i in range(0, len(images), batch_size):
        texts = [build_prompt(q) for q in questions[i : i + batch_size]]
        inputs = processor(images=images[i : i + batch_size], text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]  # (B, new tokens)
        answers += [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def first_word(text: str) -> str:
    words = [w for w in L.words_of(text) if w.isalpha() or "-" in w]
    return words[0] if words else ""


def cider(candidates: dict[int, str], references: dict[int, list[str]]) -> float | None:
    """Corpus CIDEr-D of a whole set in one call (the eval harness's pycocoevalcap scoring; needs
    Java). None without Java."""
    from ..evaluation.metrics import JavaMissing, caption_metrics

    try:
        return float(caption_metrics(candidates, references)["CIDEr"])
    except JavaMissing:
        return None


def evaluate(model, processor, seed: int = 1, n: int = 100, blank: bool = False, batch_size: int = 32, with_cider: bool = True) -> dict:
    """Run all three tasks on `n` held-out scenes; returns a nested dict of metrics."""
    size = processor.image_processor.crop_size["height"]
    scenes: list[Scene] = [sample_scene(eval_scene_seed(seed, i)) for i in range(n)]
    if blank:
        images = [render(replace(s, objects=()), size) for s in scenes]
    else:
        images = [render(s, size) for s in scenes]
    results: dict = {"n_images": n, "blank": blank}

    # Captions (default, content-first style).
    prompt = L.CAPTION_PROMPTS[L.DEFAULT_CAPTION_STYLE]
    caps = generate(model, processor, images, [prompt] * n, max_new_tokens=96, batch_size=batch_size)
    f1s, attrs = [], defaultdict(list)
    tp = n_pred = n_gold = 0
    for s, c in zip(scenes, caps):
        pred, gold = L.parse_caption(c), L.scene_objects(s)
        f1s.append(L.object_f1(pred, gold)["f1"])
        tp += len(pred & gold)
        n_pred += len(pred)
        n_gold += len(gold)
        for k, v in L.attribute_accuracy(pred, gold).items():
            attrs[k].append(v)
    micro_p = tp / n_pred if n_pred else 0.0
    micro_r = tp / n_gold if n_gold else 0.0
    results["caption"] = {
        "object_f1": sum(f1s) / n,
        "object_f1_micro": 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0,
        "exact": sum(c == L.caption(s) for s, c in zip(scenes, caps)) / n,
        **{f"{k}_acc": sum(v) / n for k, v in attrs.items()},
        "examples": caps[:3],
    }
    if with_cider:
        results["caption"]["cider"] = cider(dict(enumerate(caps)), {i: L.captions(s) for i, s in enumerate(scenes)})

    # Short answers: one question of each type per scene.
    qs = [(i, q) for i, s in enumerate(scenes) for q in L.short_questions(s)]
    ans = generate(model, processor, [images[i] for i, _ in qs], [q.question for _, q in qs], max_new_tokens=4, batch_size=batch_size)
    per_type = defaultdict(list)
    for (_, q), a in zip(qs, ans):
        per_type[q.type].append(first_word(a) == q.answer)
    results["qa"] = {t: sum(v) / len(v) for t, v in sorted(per_type.items())}
    results["qa"]["all"] = sum(sum(v) for v in per_type.values()) / len(qs)

    # POPE, three splits.
    results["pope"] = {}
    for split in L.POPE_SPLITS:
        items = [(i, q, label) for i, s in enumerate(scenes) for q, label in L.pope_questions(s, split)]
        ans = generate(model, processor, [images[i] for i, _, _ in items], [q for _, q, _ in items], max_new_tokens=2, batch_size=batch_size)
        pred = [first_word(a) == "yes" for a in ans]
        gold = [label == "yes" for _, _, label in items]
        tp = sum(p and g for p, g in zip(pred, gold))
        prec = tp / sum(pred) if sum(pred) else 0.0
        rec = tp / sum(gold) if sum(gold) else 0.0
        results["pope"][split] = {
            "accuracy": sum(p == g for p, g in zip(pred, gold)) / len(items),
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "yes_ratio": sum(pred) / len(items),
            "n": len(items),
        }
    return results
