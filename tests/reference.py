"""An independent, slow reference for pruned generation (greedy, one row, no padding).

It shares no code with the engine: every step recomputes the whole sequence with no cache, layer by
layer, with eager attention computed here from the module weights, under per-layer, per-query masks
that hide the image keys a query may not see. The probe is computed from q and k directly. The
policies' rules are restated here from DESIGN.md, not imported.

Semantics restated: a query processed at step t (prompt tokens at step 0, the t-th generated
token's column at step t) sees, in the layers of stage s, the image columns visible[t][s]. At each
step, stage s decides at its probe layer K_s - 1 from the newest query's head-averaged attention:
evict keeps the top min(target, |cand|) of the tokens still kept (cand = visible[t-1][s] minus what
earlier stages dropped this step); mask keeps the top target of those the probe layer sees.
Policies in PREFILL_RANKED rank by the prefill's probe row at every step instead of the step's own.
"""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


PREFILL_RANKED = ("progressive",)  # policies that rank by the prefill's probe at every step


def policy_rule(spec: str):
    """(stages, target(stage, step, n_img) -> int | None) restated from the policy docs."""
    name, _, rest = spec.partition(":")
    params = dict(p.split("=") for p in rest.split(",") if p)
    keep = lambda r, n: int(math.ceil(round((1 - r) * n, 6)))  # noqa: E731
    if name == "none":
        return ((int(params["k"]),) if "k" in params else ()), (lambda s, t, n: n)
    if name == "fastv":
        k, r = int(params["k"]), float(params["r"])
        return (k,), (lambda s, t, n: keep(r, n) if t == 0 else None)
    if name == "fixed":
        k, r = int(params["k"]), float(params["r"])
        return (k,), (lambda s, t, n: keep(r, n))
    if name == "vtw":
        return (int(params["k"]),), (lambda s, t, n: 0 if t == 0 else None)
    if name == "progressive":  # a shrinking schedule over steps, ranked by the prefill's probe (see PREFILL_RANKED)
        k = int(params.pop("k"))
        steps = {int(a): float(b) for a, b in params.items()}
        return (k,), (lambda s, t, n: keep(steps[t], n) if t in steps else None)
    if name == "schedule":
        steps = sorted((int(a), float(b)) for a, b in params.items())
        return tuple(k for k, _ in steps), (lambda s, t, n: keep(steps[s][1], n) if t == 0 else None)
    raise ValueError(spec)


def _layer(layer, h, positions, rotary, mask, probe_out=None, probs_out=None):
    """One Llama decoder layer, eager. h: (T, d); mask: (T, T) bool (True = attend). probe_out gets
    the newest query's head-averaged row (T,), probs_out every query's probabilities (H, T, T)."""
    attn = layer.self_attn
    n_t = h.shape[0]
    x = layer.input_layernorm(h)
    d_head = attn.head_dim
    q = attn.q_proj(x).view(n_t, -1, d_head).transpose(0, 1)  # (H, T, D)
    k = attn.k_proj(x).view(n_t, -1, d_head).transpose(0, 1)  # (Hkv, T, D)
    v = attn.v_proj(x).view(n_t, -1, d_head).transpose(0, 1)
    cos, sin = rotary(h[None], positions[:, None, :] if positions.dim() == 2 else positions[None])  # (A, T) or (T,)
    q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
    q, k = q[0], k[0]
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)  # (H, T, D)
    scores = (q @ k.transpose(1, 2)) * attn.scaling  # (H, T, T)
    scores = scores.masked_fill(~mask[None], float("-inf"))
    p = scores.float().softmax(-1)
    if probe_out is not None:
        probe_out.append(p[:, -1, :].mean(0))  # newest query, head-averaged (T,)
    if probs_out is not None:
        probs_out.append(p)
    o = (p.to(v.dtype) @ v).transpose(0, 1).reshape(n_t, -1)
    h = h + attn.o_proj(o)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _image_features(model, vision) -> torch.Tensor:
    """(N_img, d) features of the row's image from the model's own vision function (the reference
    restates the decoder, not the vision tower)."""
    kwargs = {k: v for k, v in vision.items() if k != "mm_token_type_ids"}
    for key in ("vision_feature_layer", "vision_feature_select_strategy"):
        if hasattr(model.config, key):
            kwargs[key] = getattr(model.config, key)
    return torch.cat(list(model.model.get_image_features(**kwargs, return_dict=True).pooler_output))


def _positions(model, input_ids, grid, n_total: int) -> torch.Tensor:
    """RoPE positions of the prompt and the new tokens: (T,) 0..T-1, or for M-RoPE models (3, T)
    from the model's get_rope_index for the prompt, then the last position + 1 on all three axes
    for each new token."""
    if not hasattr(model.model, "get_rope_index"):
        return torch.arange(n_total)
    types = (input_ids == model.config.image_token_id).int()
    prompt, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grid)
    prompt = prompt[:, 0]  # (3, P)
    steps = torch.arange(1, n_total - prompt.shape[1] + 1)
    return torch.cat([prompt, prompt[:, -1:] + steps], dim=1)


@torch.no_grad()
def reference_generate(model, input_ids, pixel_values, spec: str, mode: str, max_new_tokens: int, eos: int):
    """Returns (new token ids, kept image columns per stage per step). pixel_values: LLaVA's
    tensor, or the processor's vision outputs (a mapping) for any family."""
    lm = model.model.language_model
    image_id = model.config.image_token_id
    vision = pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values}
    ids = input_ids[0].tolist()
    n_prompt = len(ids)
    img_cols = [c for c, tok in enumerate(ids) if tok == image_id]
    stages, target = policy_rule(spec)
    prefill_ranked = spec.partition(":")[0] in PREFILL_RANKED
    first_rows: dict[int, torch.Tensor] = {}  # stage -> the prefill's probe row
    feats = _image_features(model, vision)
    prompt_emb = lm.embed_tokens(input_ids[0]).clone()
    prompt_emb[torch.tensor(img_cols)] = feats
    bounds = [0, *stages, len(lm.layers)]
    stage_of = [max(i for i in range(len(bounds) - 1) if bounds[i] <= layer) for layer in range(len(lm.layers))]
    visible: list[list[set[int]]] = []  # visible[t][s]: image columns stage s lets step t's queries see
    new_tokens: list[int] = []
    for t in range(max_new_tokens):
        seq = ids + new_tokens
        n_t = len(seq)
        step_of = [0 if c < n_prompt else c - n_prompt + 1 for c in range(n_t)]
        h = torch.cat([prompt_emb, lm.embed_tokens(torch.tensor(new_tokens, dtype=torch.long))]) if new_tokens else prompt_emb
        positions = _positions(model, input_ids, vision.get("image_grid_thw"), n_t)
        vis_t: list[set[int]] = [set(img_cols)]
        visible.append(vis_t)
        is_img = torch.zeros(n_t, dtype=torch.bool)
        is_img[img_cols] = True
        causal = torch.ones(n_t, n_t, dtype=torch.bool).tril()
        for layer_idx, layer in enumerate(lm.layers):
            s = stage_of[layer_idx]
            seen = torch.zeros(n_t, n_t, dtype=torch.bool)  # seen[i, j]: image column j visible to query i
            for i in range(n_t):
                seen[i, sorted(visible[step_of[i]][s])] = True
            mask = causal & (~is_img[None, :] | seen | torch.eye(n_t, dtype=torch.bool))
            is_probe = s + 1 < len(bounds) - 1 and layer_idx == bounds[s + 1] - 1
            probe_out = [] if is_probe else None
            h = _layer(layer, h, positions, lm.rotary_emb, mask, probe_out)
            if is_probe:
                row = probe_out[0]
                ns = s + 1
                if prefill_ranked:  # every step ranks by the prefill's probe
                    row = first_rows.setdefault(ns, row)
                seen_probe = vis_t[s]  # image columns the probe layer lets this query see
                n_img = len(img_cols)
                if mode == "evict":
                    before = visible[t - 1][ns] if t > 0 else set(img_cols)
                    cand = sorted(before & seen_probe)
                else:
                    cand = sorted(seen_probe)
                want = target(ns - 1, t, n_img)
                if want is None:
                    prev = visible[t - 1][ns] if t > 0 else set(img_cols)
                    vis_t.append(prev & seen_probe)
                else:
                    k = min(want, len(cand))
                    ranked = sorted(cand, key=lambda c: (-float(row[c]), c))
                    vis_t.append(set(ranked[:k]))
        logits = model.lm_head(lm.norm(h[-1:]))[0]
        nxt = int(logits.argmax())
        new_tokens.append(nxt)
        if nxt == eos:
            break
    kept = [[sorted(v) for v in vis[1:]] for vis in visible]
    return new_tokens, kept

