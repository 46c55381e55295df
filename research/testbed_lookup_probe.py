"""Why a testbed model fails short answers: three probes on validation scenes (seed 2, never the
held-out seed 1).

    python research/testbed_lookup_probe.py --model runs/tb-v9 [--n 150] [--threads 2]

1. Accuracy by how the question names its object: by position ("what colour is the object at
   the left?") or by shape/colour ("what colour is the circle?", "where is the red star?"), split
   by the number of objects in the scene (with one object every lookup is trivial).
2. Where the image embeddings lose their location: a least-squares linear probe, per vision-tower
   layer and on the projector output, predicting the 3x3 grid cell each patch lies in (chance
   1/9 = 0.11; fitted on half the patches, scored on the other half).
3. Whether any decoder head finds the named object: for "where is <object>?" in scenes with >= 3
   objects, the share of each head's image attention (last prompt token) that goes to the named
   object's patches, among all object patches, beside the object's share of those patches
   (a head that looks up the object by its shape would sit far above that baseline).
4. Whether the question's last prompt token knows what the question asks for: a least-squares
   linear probe, per decoder layer input, predicting the colour and the shape a POPE question
   names ("is there a red star in the image?", random categories; chance 1/6) from that token's
   state (fitted on half the questions, scored on the other half). A lookup at layer l can only
   search for what that state holds.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dyrate.testbed import language as L
from dyrate.testbed.data import eval_scene_seed
from dyrate.testbed.evaluate import first_word, generate
from dyrate.testbed.processing import build_prompt, pixel_values
from dyrate.testbed.scenes import (
    COLOUR_NAMES,
    SHAPES,
    patch_labels,
    render,
    sample_scene,
)
from dyrate.testbed.batches import patch_cells


def lookup_accuracy(model, processor, scenes, images) -> dict:
    items = [(i, q) for i, s in enumerate(scenes) for q in L.short_questions(s) if q.type in ("colour", "position", "size", "count")]
    answers = generate(model, processor, [images[i] for i, _ in items], [q.question for _, q in items], max_new_tokens=4)
    hits: dict[str, list[bool]] = defaultdict(list)
    for (i, q), a in zip(items, answers):
        by = "position" if any(p in L.words_of(q.question) for p in L.POSITIONS) else "content"
        n = len(scenes[i].objects)
        hits[f"{q.type} by {by}, {'1 object' if n == 1 else '2+ objects'}"].append(first_word(a) == q.answer)
    return {k: {"accuracy": round(sum(v) / len(v), 3), "n": len(v)} for k, v in sorted(hits.items())}


def location_probe(model, images) -> dict:
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values(images, images[0].size[0]), output_hidden_states=True)
        layers = [h[:, 1:] for h in out.hidden_states]  # (B, P, Dv) each, CLS dropped
        layers.append(model.model.multi_modal_projector(out.hidden_states[-1][:, 1:]))  # (B, P, D)
    p = layers[0].shape[1]
    y = patch_cells(p).repeat(len(images))  # (B*P,)
    result = {}
    for k, h in enumerate(layers):
        name = "embeddings" if k == 0 else "projector" if k == len(layers) - 1 else f"tower layer {k}"
        result[name] = lstsq_accuracy(h.reshape(-1, h.shape[-1]), y, 9)  # (B*P, D) -> cell
    return result


def lstsq_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    """Held-out accuracy of a least-squares linear probe x (N, D) -> y (N,): first half fits, second half scores."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1)  # (N, D+1) with a bias column
    half = len(x) // 2
    w = torch.linalg.lstsq(x[:half], torch.nn.functional.one_hot(y[:half], classes).float()).solution
    return round(((x[half:] @ w).argmax(1) == y[half:]).float().mean().item(), 3)


def query_probe(model, processor, scenes, images) -> dict:
    rng = random.Random(0)
    per_scene = 4  # questions per image, so the probe has more examples than features
    asked = [(rng.choice(COLOUR_NAMES), rng.choice(SHAPES)) for _ in range(per_scene * len(scenes))]
    states = []  # per chunk: L x (n, D), the last prompt token's state entering each layer
    for i in range(0, len(asked), 100):
        chunk = asked[i : i + 100]
        inputs = processor(images=[images[(i + j) // per_scene] for j in range(len(chunk))],
                           text=[build_prompt(L.pope_question(c, s)) for c, s in chunk], return_tensors="pt", padding=True)
        assert bool(inputs["attention_mask"].all()), "POPE prompts all have the same length: no padding"
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states  # L+1 x (n, T, D)
        states.append([h[:, -1] for h in hidden[: model.config.text_config.num_hidden_layers]])
    colour = torch.tensor([COLOUR_NAMES.index(c) for c, _ in asked])
    shape = torch.tensor([SHAPES.index(s) for _, s in asked])
    out = {}
    for i, layer_states in enumerate(zip(*states)):
        x = torch.cat(layer_states)  # (N, D)
        out[f"layer {i} input"] = {"colour": lstsq_accuracy(x, colour, len(COLOUR_NAMES)), "shape": lstsq_accuracy(x, shape, len(SHAPES))}
    return out


def head_shares(model, processor, scenes) -> dict:
    eager = LlavaForConditionalGeneration.from_pretrained(model.name_or_path, dtype=torch.float32, attn_implementation="eager").eval()
    img_id = eager.config.image_token_index
    shares, base = [], []
    for s in scenes:
        if len(s.objects) < 3:
            continue
        qs = [q for q in L.short_questions(s) if q.type == "position"]  # "where is the circle?": named by content
        if not qs:
            continue
        q = qs[0]
        image, label_map = render(s, processor.image_processor.crop_size["height"], with_labels=True)
        cells = torch.from_numpy(patch_labels(s, label_map, eager.config.vision_config.patch_size)[:, 3])  # (P,) object cell + 1, 0 = bg
        (target,) = [o for o in s.objects if o.position == q.answer]
        on_target, on_object = cells == target.cell + 1, cells > 0
        inputs = processor(images=[image], text=[build_prompt(q.question)], return_tensors="pt")
        with torch.no_grad():
            att = eager(**inputs, output_attentions=True).attentions  # L x (1, H, T, T)
        cols = (inputs["input_ids"][0] == img_id).nonzero()[:, 0]
        per_layer = []
        for a in att:
            row = a[0, :, -1, cols]  # (H, P) last prompt token -> image tokens
            per_layer.append(row[:, on_target].sum(1) / row[:, on_object].sum(1).clamp(min=1e-9))
        shares.append(torch.stack(per_layer))  # (L, H)
        base.append(on_target.sum() / on_object.sum())
    mean = torch.stack(shares).mean(0)  # (L, H)
    return {"questions": len(shares), "baseline": round(torch.stack(base).float().mean().item(), 3),
            "per_layer_head": [[round(v, 3) for v in row.tolist()] for row in mean],
            "max": round(mean.max().item(), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=150, help="validation scenes (seed 2) [150]")
    ap.add_argument("--json", default=None, help="also write the report to this file")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    size = processor.image_processor.crop_size["height"]
    scenes = [sample_scene(eval_scene_seed(2, i)) for i in range(args.n)]
    images = [render(s, size) for s in scenes]
    report = {
        "model": args.model,
        "scenes": args.n,
        "lookup_accuracy": lookup_accuracy(model, processor, scenes, images),
        "location_probe": location_probe(model, images[:100]),
        "head_shares": head_shares(model, processor, scenes),
        "query_probe": query_probe(model, processor, scenes, images),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
