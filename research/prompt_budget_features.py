"""Can a prefill feature predict how many image tokens a prompt needs? (session 11, issue 15)

For N training prompts and M test prompts (`dyrate.testbed.data.predictor_samples`, seed 0 and 1:
scene ranges neither the VLM nor the evaluation sets use) this computes, once, the per-prompt oracle
bin (`dyrate.learn.oracle.prompt_oracle_from_kls`, prefill ranking: the most FastV-style pruning at
layer K whose teacher-forced next-token KL stays <= D at *every* answer step) and candidate features
of the prefill, all after layer K-1:

- `last`: the last prompt token's hidden state, RMS-normalised (the shipped `hidden` feature);
- `shares`: the last prompt token's attention shares (sys, img, ins, res);
- `img_mean`, `img_max`, `img_w`: the image tokens' RMS-normalised hidden states, mean-, max- and
  probe-weighted-pooled (what the image holds: how many objects, how large);
- `prof`: the last prompt token's attention over the image tokens, sorted, at 24 quantiles, and its
  cumulative sum (how concentrated the ranking is), on a log scale.

It fits one small classifier per feature set (MLP 64 wide, dropout, AdamW, 600 full-batch steps,
cross-entropy to the oracle bins, standardised inputs) and reports on the test prompts, for the
lowest bin whose cumulative predicted probability reaches q (the `q=` of the policy), the mean kept
fraction and the share of prompts pruned *more* than their oracle allows ("viol"), for captions and
questions apart. A feature helps if it lowers the kept fraction at the same violation share.

    python research/prompt_budget_features.py --train 768 --test 384 --kl 0.001,0.01,0.05 --threads 2   # 6 minutes
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from dyrate.api import load
from dyrate.learn import TrainConfig, build_cache
from dyrate.learn.oracle import bin_kls, prompt_oracle_from_kls
from dyrate.testbed.data import predictor_samples
from dyrate.testbed.language import CAPTION_PROMPTS

FEATURE_SETS = ("last", "shares+last", "last+img_mean+img_max+img_w", "last+prof",
                "shares+last+img_mean+img_max+img_w+prof", "img_mean+img_max+img_w+prof")


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def prompt_features(model, processor, n: int, seed: int, bins: int, k: int) -> list[dict]:
    """Per prompt: the candidate features, the (T, bins) per-bin KLs and whether it is a caption."""
    samples = predictor_samples(model.config.vision_config.image_size, n, seed=seed)
    cfg = TrainConfig(k=k, bins=bins, objective="kl", rank="prefill", lam=0.0)
    cache = build_cache(model, processor, samples, cfg, 64, log=print)
    rows = []
    for s, c in zip(samples, cache):
        h = rms(c.hidden[0])  # (L, d) after layer K-1
        img = h[c.img_cols]  # (N_img, d)
        att = c.probe[0, c.img_cols]  # (N_img,) the last prompt token's attention to each image token
        w = att / att.sum()
        prof = att.sort(descending=True).values[torch.linspace(0, len(att) - 1, 24).long()]  # (24,)
        rows.append({
            "last": h[c.n_prompt - 1], "img_mean": img.mean(0), "img_max": img.max(0).values,
            "img_w": (w[:, None] * img).sum(0),
            "prof": torch.cat([torch.log(prof + 1e-6), torch.log(prof.cumsum(0) + 1e-6)]),
            "shares": c.probe[0] @ F.one_hot(c.groups, 5)[:, :4].float(),
            "kl": bin_kls(model, c, bins, k, cfg.eps, "prefill"),
            "caption": s.prompt in CAPTION_PROMPTS.values(),
        })
    return rows


def fit(x: torch.Tensor, y: torch.Tensor, bins: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.GELU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(64, bins))
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=0.05)
    for _ in range(600):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=768)
    ap.add_argument("--test", type=int, default=384)
    ap.add_argument("--kl", default="0.001,0.01,0.05", help="oracle KL thresholds D")
    ap.add_argument("--q", default="0.02,0.05,0.1")
    ap.add_argument("--bins", type=int, default=10)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load(None)
    train = prompt_features(model, processor, args.train, 0, args.bins, args.k)
    test = prompt_features(model, processor, args.test, 1, args.bins, args.k)
    keep = torch.tensor([math.ceil((1 - i / args.bins) * 144) / 144 for i in range(args.bins)])
    cap = torch.tensor([r["caption"] for r in test])
    for d in (float(x) for x in args.kl.split(",")):
        y_tr = torch.cat([prompt_oracle_from_kls(r["kl"], d) for r in train])
        y_te = torch.cat([prompt_oracle_from_kls(r["kl"], d) for r in test])
        print(f"\nD = {d:g}: oracle keeps (test) {keep[y_te].mean():.3f}: captions {keep[y_te[cap]].mean():.3f} "
              f"({int(cap.sum())}), questions {keep[y_te[~cap]].mean():.3f} ({int((~cap).sum())})")
        print("| features | q | kept | captions: kept / viol | questions: kept / viol |\n|---|---:|---:|---|---|")
        for names in FEATURE_SETS:
            x_tr = torch.stack([torch.cat([r[n].float() for n in names.split("+")]) for r in train])
            x_te = torch.stack([torch.cat([r[n].float() for n in names.split("+")]) for r in test])
            mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-4
            net = fit((x_tr - mu) / sd, y_tr, args.bins)
            with torch.no_grad():
                p = net((x_te - mu) / sd).softmax(-1)  # (M, bins)
            for q in (float(x) for x in args.q.split(",")):
                b = (p.cumsum(-1) >= q).long().argmax(-1)  # the lowest bin reaching q, as the policy's q=
                viol = (b > y_te).float()
                print(f"| {names} | {q:g} | {keep[b].mean():.3f} | {keep[b[cap]].mean():.3f} / {viol[cap].mean():.2f} "
                      f"| {keep[b[~cap]].mean():.3f} / {viol[~cap].mean():.2f} |")


if __name__ == "__main__":
    main()
