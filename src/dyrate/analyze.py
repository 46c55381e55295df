"""Attention shares over generation: the seed's central figure.

For every probe layer L and generation step t, the mean over rows of the attention that the newest
query at layer L gives to each token group (sys, img, ins, res), head-averaged: step 0 is the
prefill (the last prompt token), step t >= 1 the query of the t-th generated token. The probe is
the engine's own (`none:k=L+1` probes layer L every step and prunes nothing), so these are exactly
the shares a pruning policy sees. Rows stop contributing after their last token; `count[t]` says
how many rows a step's mean covers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from .api import generate, read_image
from .errors import InputError
from .policies import GROUPS


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
