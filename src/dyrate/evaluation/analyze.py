"""Attention shares over generation: the seed's central figure.

For every probe layer L and generation step t, the mean over rows of the attention that the newest
query at layer L gives to each token group (sys, img, ins, res), head-averaged: step 0 is the
prefill (the last prompt token), step t >= 1 the query of the t-th generated token. The probe is
the engine's own (`none:k=L+1` probes layer L every step and prunes nothing), so these are exactly
the shares a pruning policy sees. Rows stop contributing after their last token; `count[t]` says
how many rows a step's mean covers.

With a pruning policy instead (`policy_trace`): the share vector its first stage saw, the rate it
chose and the image tokens it kept, mean over rows per step, plus one row token by token: the
DyRate ablation figure (the chosen rate and the share vector over generation steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from ..adapters import GROUPS
from ..adapters.inputs import read_image
from ..api import generate
from ..errors import InputError


def attention_shares(
    model,
    processor,
    images: Sequence,
    prompts: Sequence[str],
    layers: Sequence[int],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Mean share per group and step for each probe layer (greedy, no pruning).

    Returns {"layers": {L: {"count": [..], "sys": [..], "img": [..], "ins": [..], "res": [..]}},
    "texts": [generated text of each row]}; lists are indexed by step."""
    n_layers = model.config.get_text_config().num_hidden_layers
    for layer in layers:
        if not 0 <= layer <= n_layers - 2:
            raise InputError(f"probe layer {layer} is out of range: this decoder has {n_layers} layers, probe layers are 0..{n_layers - 2}")
    if len(images) != len(prompts) or not prompts:
        raise InputError(f"need one image per prompt, got {len(images)} images and {len(prompts)} prompts")
    out: dict = {"layers": {}, "texts": []}
    for layer in layers:
        sums: list[list[float]] = []  # [step][group]
        count: list[int] = []
        texts = []
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            pil = [read_image(i) for i in images[chunk]]
            results = generate(model, processor, pil, list(prompts[chunk]), policy=f"none:k={layer + 1}", max_new_tokens=max_new_tokens)
            for res in results:
                texts.append(res.text)
                for t, step in enumerate(res.trace):
                    shares = step["shares"][0]
                    if shares is None or any(math.isnan(shares[g]) for g in GROUPS):
                        continue
                    while len(sums) <= t:
                        sums.append([0.0] * len(GROUPS))
                        count.append(0)
                    for j, g in enumerate(GROUPS):
                        sums[t][j] += shares[g]
                    count[t] += 1
            if progress is not None:
                progress(len(results))
        means = {g: [s[j] / c for s, c in zip(sums, count)] for j, g in enumerate(GROUPS)}
        out["layers"][layer] = {"count": count, **means}
        out["texts"] = out["texts"] or texts  # the same for every layer: nothing is pruned
    return out


def plot_shares(result: dict, path: str | Path, title: str = "") -> None:
    """One panel per probe layer: mean share of each group against generation step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(result["layers"])
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        d = result["layers"][layer]
        steps = list(range(len(d["count"])))
        for g in GROUPS:
            ax.plot(steps, d[g], label=g, linewidth=1.6)
        ax.set_title(f"probe layer {layer}")
        ax.set_xlabel("generation step (0 = prefill)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("mean attention share")
    axes.flat[0].legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def policy_trace(model, processor, images: Sequence, prompts: Sequence[str], policy: str, mode: str = "evict",
                 max_new_tokens: int = 64, batch_size: int = 8, progress: Callable[[int], None] | None = None) -> dict:
    """Per step (mean over the rows still generating): the share vector of the policy's first
    stage (NaN at steps where it ran no probe), its rate (the rate in force at steps where it did
    not decide) and the fraction of image tokens kept after the probe layer; and the first row token
    by token. Returns {"policy", "mode", "count", "rate", "kept", sys/img/ins/res: [...],
    "example": {"prompt", "tokens", "rate", "img"}, "texts"}."""
    from ..policies import parse_policy

    pol = parse_policy(policy)
    if not pol.stages:
        raise InputError(f"policy {policy!r} never probes: give a pruning policy (or none:k=K)")
    if len(images) != len(prompts) or not prompts:
        raise InputError(f"need one image per prompt, got {len(images)} images and {len(prompts)} prompts")
    k = pol.stages[0]
    keys = ("rate", "kept", *GROUPS)
    sums: dict[str, list[float]] = {key: [] for key in keys}
    counts: dict[str, list[int]] = {key: [] for key in keys}  # shares are missing where no probe ran
    count: list[int] = []
    out: dict = {"policy": pol.spec(), "mode": mode, "texts": []}
    tok = getattr(processor, "tokenizer", processor)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        pil = [read_image(i) for i in images[chunk]]
        results = generate(model, processor, pil, list(prompts[chunk]), policy=pol, mode=mode, max_new_tokens=max_new_tokens)
        for res in results:
            out["texts"].append(res.text)
            rows = []
            for t, step in enumerate(res.trace):
                shares, rate = step["shares"][0], step["rate"][0]
                n_img = max(step["kept"][0], 1)  # layer 0 sees every image token
                kept = step["kept"][k] / n_img
                if shares is None and rate is None and not pol.decode_decides:
                    continue  # a step the policy did not look at
                # a step without a decision runs at the rate in force (what it keeps); no probe: no shares
                values = {"rate": rate if rate is not None else 1.0 - kept, "kept": kept,
                          **(shares or {g: float("nan") for g in GROUPS})}
                while len(count) <= t:
                    count.append(0)
                    for key in keys:
                        sums[key].append(0.0)
                        counts[key].append(0)
                count[t] += 1
                for key in keys:
                    if not math.isnan(values[key]):
                        sums[key][t] += values[key]
                        counts[key][t] += 1
                rows.append((t, values))
            if "example" not in out:
                ids = res.token_ids
                out["example"] = {
                    "prompt": prompts[start],
                    "tokens": [tok.decode([ids[t]]) if t < len(ids) else "" for t, _ in rows],
                    "rate": [v["rate"] for _, v in rows],
                    "img": [v["img"] for _, v in rows],
                }
        if progress is not None:
            progress(len(results))
    out["count"] = count
    for key in keys:
        out[key] = [v / c if c else float("nan") for v, c in zip(sums[key], counts[key])]
    return out


def plot_policy(result: dict, path: str | Path, title: str = "") -> None:
    """Left: mean share vector and mean chosen rate per step; right: the example row token by token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1.6]})
    steps = list(range(len(result["count"])))
    for g in GROUPS:
        left.plot(steps, result[g], label=f"share {g}", linewidth=1.4)
    left.plot(steps, result["rate"], "k--", label="chosen rate", linewidth=2)
    left.set_xlabel("generation step (0 = prefill)")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="upper right")
    left.set_title("mean over rows")
    ex = result.get("example")
    if ex:
        x = list(range(len(ex["rate"])))
        right.bar(x, ex["rate"], color="tab:gray", label="chosen rate")
        right.plot(x, ex["img"], "o-", color="tab:orange", label="img share", markersize=3)
        right.set_xticks(x)
        right.set_xticklabels(ex["tokens"], rotation=90, fontsize=7)
        right.set_ylim(0, 1)
        right.legend(fontsize=7, loc="upper right")
        right.set_title(f"one row: the rate chosen before each token ({ex['prompt'][:40]!r})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
