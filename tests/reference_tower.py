"""Independent restatement of VisionZip and PruMerge on the towers dyrate reads through tiles:
LLaVA-NeXT / OneVision (a base image and crops; OneVision's SigLIP has no class token) and
Qwen2-VL / Qwen2.5-VL (no class token, merged 2x2 tokens, attention windows). Written from
docs/methods.md ("Vision towers: crops and no class token") and the authors' NeXT code; it shares no
code with dyrate. q and k are what the tower's attention modules really receive (after rotary, per
attention chunk), caught by an attention function registered with transformers' AttentionInterface;
which image token a crop patch becomes is found by matching its projected state against the
model's own packed features."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CAUGHT = []


def _catch(module, query, key, value, attention_mask, **kwargs):
    CAUGHT.append((module, query, key))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("dyrate_reference_catch", _catch)


def _caught(config, run):
    impl = config._attn_implementation
    config._attn_implementation = "dyrate_reference_catch"
    CAUGHT.clear()
    try:
        out = run()
    finally:
        config._attn_implementation = impl
    return out, list(CAUGHT)


# ------------------------------------------------------------------ tiles, gathered from the model
def llava_next_tiles(model, vision):
    """Per image: list of tiles dict(q, k (T, H, D) per layer, cls, states (u, dv), slots (u,))."""
    tower = model.model.vision_tower
    packed = model.model.get_image_features(pixel_values=vision["pixel_values"], image_sizes=vision["image_sizes"],
                                            return_dict=True).pooler_output
    pixels = vision["pixel_values"]
    counts = [int((px.flatten(1).abs().sum(1) > 0).sum()) for px in pixels]  # passes per image (zero padding after)
    flat = torch.cat([px[:c] for px, c in zip(pixels, counts)])
    out, caught = _caught(tower.config, lambda: tower(flat, output_hidden_states=True))
    layers = [m for m, _, _ in caught]
    cls = model.config.vision_feature_select_strategy == "default"
    hidden = out.hidden_states[-1]  # feature layer -1 in the tiny checkpoints
    images, start = [], 0
    for c, feats in zip(counts, packed):
        tiles = []
        for r in range(start, start + c):
            states = hidden[r, 1:] if cls else hidden[r]
            proj = model.model.multi_modal_projector(states)  # (u, d)
            dist = torch.cdist(proj, feats)  # (u, n)
            best = dist.argmin(1)
            slots = torch.where(dist.min(1).values < 1e-4, best, torch.full_like(best, -1))
            qk = {layers.index(m): (q[r].transpose(0, 1), k[r].transpose(0, 1)) for m, q, k in caught}
            tiles.append(dict(qk=qk, cls=hidden[r, 0] if cls else None, states=states, slots=slots, group=1,
                              chunks=None))
        images.append(tiles)
        start += c
    return images, len(layers)


def qwen_tiles(model, vision):
    """Per image: one tile; q / k in the processor's patch order, each layer's chunks (window ids)."""
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    grid = vision["image_grid_thw"]
    out, caught = _caught(visual.config, lambda: visual(vision["pixel_values"], grid_thw=grid))
    n_layers = len(visual.blocks)
    per_layer = {i: [(q[0].transpose(0, 1), k[0].transpose(0, 1)) for m, q, k in caught if m is blk.attn]
                 for i, blk in enumerate(visual.blocks)}  # chunks in sequence order, each (S_c, H, D)
    units = int(grid.prod(-1).sum()) // 4
    if hasattr(visual, "window_size"):
        index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=visual.window_size,
                                           patch_size=visual.patch_size)
    else:
        index = torch.arange(units)
    back = torch.argsort(index)

    def natural(x):  # (S, ...) tower order -> processor order, 4 patches a unit
        return x.reshape(units, 4, *x.shape[1:])[back].reshape(x.shape)

    qk, chunk_ids = {}, {}
    for i, chunks in per_layer.items():
        qk[i] = tuple(natural(torch.cat([c[j] for c in chunks])) for j in (0, 1))
        chunk_ids[i] = natural(torch.cat([torch.full((c[0].shape[0],), n) for n, c in enumerate(chunks)]))
    states = natural(out.last_hidden_state)
    states = visual.merger.ln_q(states).reshape(units, -1)
    images, lo = [], 0
    for g in grid:
        p = int(g.prod())
        sl = slice(lo, lo + p)
        images.append([dict(qk={i: (q[sl], k[sl]) for i, (q, k) in qk.items()}, cls=None,
                            states=states[lo // 4:(lo + p) // 4], slots=torch.arange(p // 4), group=4,
                            chunks={i: c[sl] for i, c in chunk_ids.items()})])
        lo += p
    return images, n_layers


# ------------------------------------------------------------------ the rules
def _scores(tile, layer, full_width):
    q, k = tile["qk"][layer]
    if full_width:
        q, k = q.reshape(q.shape[0], 1, -1), k.reshape(k.shape[0], 1, -1)
    scale = q.shape[-1] ** -0.5
    t = q.shape[0]
    chunks = tile["chunks"][layer] if tile["chunks"] else torch.zeros(t, dtype=torch.long)
    if tile["cls"] is not None:
        keep = chunks == chunks[0]
        w = torch.softmax((q[0][None] * k[keep]).sum(-1).T * scale, dim=-1)  # (H, T_c)
        per_token = torch.zeros(k.shape[1], t)
        per_token[:, keep] = w
        per_token = per_token[:, 1:].sum(0)
    else:
        per_token = torch.zeros(t)
        for c in chunks.unique():
            idx = (chunks == c).nonzero()[:, 0]
            w = torch.softmax(torch.einsum("ihd,jhd->hij", q[idx], k[idx]) * scale, dim=-1)  # (H, c, c)
            per_token[idx] += w.sum(1).sum(0) / t
    return per_token.reshape(-1, tile["group"]).sum(1)


def _unit_keys(tile, layer, full_width):
    k = tile["qk"][layer][1]
    k = k.reshape(k.shape[0], -1) if full_width else k.mean(1)
    if tile["cls"] is not None:
        k = k[1:]
    return k.reshape(-1, tile["group"], k.shape[-1]).mean(1)


def visionzip(tiles, project, layer, dominant, contextual):
    parts = []
    for tile in tiles:
        valid = [i for i in range(len(tile["slots"])) if tile["slots"][i] >= 0]
        score = _scores(tile, layer, False)
        n_dom = min(dominant - (tile["cls"] is not None), len(valid))
        order = sorted(valid, key=lambda i: -float(score[i]))
        top = sorted(order[:n_dom])
        rest = [i for i in valid if i not in top]
        cls = [tile["cls"]] if tile["cls"] is not None and valid else []
        ctx = []
        n_ctx = min(contextual, len(rest))
        if n_ctx:
            metric = _unit_keys(tile, layer, False)[rest]
            metric = metric / metric.norm(dim=-1, keepdim=True)
            step = max(1, len(rest) // n_ctx)
            targets = list(range(0, len(rest), step))[:n_ctx]
            joined = {t: [] for t in targets}
            for j in range(len(rest)):
                if j not in targets:
                    sims = torch.stack([metric[j] @ metric[t] for t in targets])
                    joined[targets[int(sims.argmax())]].append(tile["states"][rest[j]])
            ctx = [tile["states"][rest[t]] + (torch.stack(joined[t]).mean(0) if joined[t] else 0) for t in targets]
        parts.append(([tile["states"][i] for i in top], [int(tile["slots"][i]) for i in top], cls, ctx))
    base = parts[0]
    tokens = base[2] + base[0] + base[3]
    crops = parts[1:]
    dom = sorted([(s, st) for p in crops for st, s in zip(p[0], p[1])], key=lambda pair: pair[0])
    tokens += [st for _, st in dom] + [c for p in crops for c in p[2]] + [c for p in crops for c in p[3]]
    return project(torch.stack(tokens))


def prumerge(tiles, project, n_layers, neighbours=32, plus=False, ratio=None):
    layer = n_layers - 1
    out = []
    for tile in tiles:
        valid = torch.tensor([i for i in range(len(tile["slots"])) if tile["slots"][i] >= 0], dtype=torch.long)
        if not len(valid):
            continue
        score = _scores(tile, layer, True)[valid]
        x = tile["states"][valid]
        key = F.normalize(_unit_keys(tile, layer, True)[valid], p=2, dim=-1)
        n = len(valid)
        r = ratio
        if r is None:
            values = score.float().numpy()
            q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
            r = float((values > q3 + 1.5 * (q3 - q1)).sum()) / n
        idx = torch.topk(score, int(n * r)).indices
        if plus and r > 0 and int(int(1 / r) / 3) > 0:
            extra = [v for v in range(0, n - 1, int(int(1 / r) / 3)) if v not in idx.tolist()]
            idx = torch.cat([idx, torch.tensor(extra, dtype=torch.long)])
        compl = torch.tensor(sorted(set(range(n)) - set(idx.tolist())), dtype=torch.long)
        for i in range(len(idx)):
            rest = torch.cat([idx[:i], idx[i + 1:], compl])
            near = rest[torch.topk(key[rest] @ key[idx[i]], k=min(neighbours, len(rest))).indices]
            out.append(x[idx[i]] + (x[near] * score[near, None]).sum(0))
        if len(compl):
            out.append((x[compl] * score[compl, None]).sum(0))
    return project(torch.stack(out))
