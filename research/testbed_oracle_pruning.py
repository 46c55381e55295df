"""Which image tokens does the testbed model need? Caption object F1 on held-out scenes when the
kept set (from layer K on, chosen once at prefill, evict mode) is picked by: FastV's attention,
uniformly at random, or with the ground-truth object patches first and the rest of the budget
filled with random / most-attended / ... background patches. Used in docs/testbed.md to explain
why attention-ranked pruning lost to random pruning before image-token dropout was added.

    python research/testbed_oracle_pruning.py --model runs/testbed [--n 40] [--k 2]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from dyrate.api import generate, load
from dyrate.policies.fastv import FastV
from dyrate.testbed import language as L
from dyrate.testbed.data import eval_scene_seed
from dyrate.testbed.scenes import patch_labels, render, sample_scene


@dataclass(frozen=True)
class Ranked(FastV):
    """FastV's schedule with a ranking built from the current batch's object masks."""

    how: str = "objects+random"
    objects: tuple = ()  # per batch row: (P,) bool tensor, True on object patches

    def scores(self, stage, probe, state):
        att = probe.img_scores
        out = torch.zeros_like(att)
        gen = torch.Generator().manual_seed(0)
        for r in range(att.shape[0]):
            cols = (att[r] > 0).nonzero()[:, 0]  # the image slots, in patch order
            obj = self.objects[r].float()  # (P,)
            noise = torch.rand(len(cols), generator=gen)
            if self.how == "objects+random":
                out[r, cols] = 10 * obj + noise
            elif self.how == "objects+attention":
                out[r, cols] = 10 * obj + att[r, cols] / att[r, cols].max()
            elif self.how == "inverse attention":
                out[r, cols] = 1 - att[r, cols] / att[r, cols].max()
        return out

    def spec(self) -> str:
        return f"{self.how}:k={self.k},r={self.r:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint [the shipped testbed model]")
    ap.add_argument("--n", type=int, default=40, help="held-out scenes (seed 1) [40]")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, proc = load(args.model)
    size = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    scenes = [sample_scene(eval_scene_seed(1, i)) for i in range(args.n)]
    rendered = [render(s, size, with_labels=True) for s in scenes]
    objects = [torch.from_numpy(patch_labels(s, lab, patch)[:, 0] > 0) for s, (_, lab) in zip(scenes, rendered)]
    print(f"object patches: {100 * torch.stack(objects).float().mean():.1f}% of the image tokens")
    k = args.k
    runs = [("none", None), (f"fastv:k={k},r=0.5", None), (f"random:k={k},r=0.5", None)]
    runs += [(None, (how, r)) for r in (0.5, 0.75) for how in ("objects+random", "objects+attention")]
    runs += [(None, ("inverse attention", 0.5))]
    for spec, custom in runs:
        total, name = 0.0, spec
        for i in range(0, args.n, 8):
            rows = slice(i, i + 8)
            policy = spec or Ranked(k=k, r=custom[1], how=custom[0], objects=tuple(objects[rows]))
            name = spec or policy.spec()
            res = generate(model, proc, [im for im, _ in rendered[rows]], ["describe the image."] * len(objects[rows]),
                           policy=policy, max_new_tokens=64)
            total += sum(L.object_f1(L.parse_caption(r.text), L.scene_objects(s))["f1"] for s, r in zip(scenes[rows], res))
        print(f"{name:36s} caption object F1 {total / args.n:.3f}", flush=True)


if __name__ == "__main__":
    main()
