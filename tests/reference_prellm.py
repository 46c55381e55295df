"""Independent restatements of the pre-LLM methods' selection and merging rules, written from the
authors' published code (vbdi/divprune, dvlab-research/VisionZip, 42Shawn/LLaVA-PruMerge) in its
own structure -- loops, masks and hooks as there -- and sharing no code with dyrate's policies.
The tower's attention comes from transformers' `output_attentions` (eager) and its keys / queries
from forward hooks on the projections, not from dyrate's ImageView."""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F


def divprune(features: torch.Tensor, kept: int) -> torch.Tensor:
    """Indices (sorted) DivPrune keeps of `features` (n, d)."""
    norm = features / features.norm(dim=1, keepdim=True)
    dist = 1.0 - norm @ norm.t()
    chosen = []
    for i in range(kept):
        rows = dist if i == 0 else dist[torch.tensor(chosen)]
        scores = torch.topk(rows, 2, dim=0, largest=False).values[1] if i == 0 else rows.min(dim=0).values
        if chosen:  # dyrate's one deviation (policies/divprune.py): a chosen token is not chosen again
            scores[torch.tensor(chosen)] = float("-inf")
        chosen.append(int(torch.argmax(scores)))
    return torch.tensor(sorted(chosen))


def tower_pass(model, pixel_values, layer: int):
    """Run the vision tower once: (hidden states tuple, attention probabilities of `layer` (H, T, T),
    q and k outputs of `layer`'s projections (T, C)), for the first image."""
    tower = model.model.vision_tower
    grabbed = {}
    attn = tower.encoder.layers[layer].self_attn
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: grabbed.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: grabbed.__setitem__("k", o))]
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"  # attention probabilities, as the authors' eager CLIP
    try:
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        tower.config._attn_implementation = impl
        for h in hooks:
            h.remove()
    return out.hidden_states, out.attentions[layer][0], grabbed["q"][0], grabbed["k"][0]


def visionzip(model, pixel_values, dominant: int, contextual: int) -> torch.Tensor:
    """The decoder-ready tokens VisionZip makes of the image (m, d)."""
    n_layers = len(model.model.vision_tower.encoder.layers)
    feature_layer = model.config.vision_feature_layer % (n_layers + 1) - 1
    states, attn, _, keys = tower_pass(model, pixel_values, feature_layer)
    hidden = states[feature_layer + 1][0]  # (T, C)
    heads = attn.shape[0]
    metric = keys.view(keys.shape[0], heads, -1).mean(1)  # (T, Dh)
    cls_attention = attn[:, 0, 1:].sum(0)
    top = cls_attention.topk(dominant - 1).indices + 1
    all_indices = torch.cat([torch.zeros(1, dtype=top.dtype), top])
    mask = torch.ones(hidden.shape[0], dtype=torch.bool).scatter_(0, all_indices, False)
    dominant_tokens = hidden[~mask]
    metric_rest = metric[mask]
    hidden_rest = hidden[mask]
    metric_rest = metric_rest / metric_rest.norm(dim=-1, keepdim=True)
    step = max(1, metric_rest.shape[0] // contextual)
    targets = torch.arange(0, metric_rest.shape[0], step)[:contextual]
    others = ~torch.isin(torch.arange(metric_rest.shape[0]), targets)
    similarity = metric_rest[others] @ metric_rest[targets].t()
    assign = torch.zeros(int(others.sum()), contextual, dtype=hidden.dtype)
    assign.scatter_(1, similarity.argmax(dim=1).unsqueeze(-1), 1)
    counts = assign.sum(0).clamp(min=1).unsqueeze(-1)
    aggregated = assign.t() @ hidden_rest[others] / counts
    contextual_tokens = hidden_rest[targets] + aggregated
    return model.model.multi_modal_projector(torch.cat([dominant_tokens, contextual_tokens]))


def prumerge(model, pixel_values, neighbours: int = 32, plus: bool = False, ratio: float | None = None):
    """The decoder-ready tokens PruMerge(+) makes of the image (m, d)."""
    n_layers = len(model.model.vision_tower.encoder.layers)
    feature_layer = model.config.vision_feature_layer % (n_layers + 1) - 1
    states, _, q, k = tower_pass(model, pixel_values, n_layers - 1)
    x = states[feature_layer + 1][0, 1:]  # (N, C)
    n, c = x.shape
    attn = F.softmax((q @ k.t()) * c ** -0.5, dim=-1)
    cls_attn = attn[0, 1:]
    if ratio is None:
        values = cls_attn.float().numpy().flatten()
        q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
        ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)
    idx = torch.topk(cls_attn, int(n * ratio)).indices
    if plus and ratio > 0:  # no outlier at all: their code divides by zero here; we add no spatial tokens
        seq = torch.arange(0, n - 1, int(int(1 / ratio) / 3))
        idx = torch.cat([idx, torch.tensor([int(v) for v in seq if v not in idx], dtype=idx.dtype)])
    compl = torch.tensor(sorted(set(range(n)) - set(idx.tolist())), dtype=torch.long)
    key = F.normalize(k[1:], p=2, dim=-1)
    key_kept, key_rest = key[idx], key[compl]
    x_kept, x_rest = x[idx], x[compl]
    a_kept, a_rest = cls_attn[idx], cls_attn[compl]
    out = []
    for i in range(len(idx)):
        rest_x = torch.cat([x_kept[:i], x_kept[i + 1:], x_rest])
        rest_a = torch.cat([a_kept[:i], a_kept[i + 1:], a_rest])
        rest_k = torch.cat([key_kept[:i], key_kept[i + 1:], key_rest])
        near = torch.topk(rest_k @ key_kept[i], k=min(neighbours, len(rest_k))).indices
        out.append(x_kept[i] + (rest_x[near] * rest_a[near].unsqueeze(-1)).sum(0))
    if len(compl):
        out.append((x_rest * a_rest.unsqueeze(-1)).sum(0))
    return model.model.multi_modal_projector(torch.stack(out))


def dart(model, input_ids, pixel_values, k: int, max_num_truncation: int, pivot_image: int, pivot_text: int) -> list[int]:
    """Sequence indices DART keeps (one unpadded row), in their code's structure: layer k-1's keys
    (after RoPE) from a hook on its k_proj, its outputs with the final norm from hidden_states[k]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    attn = lm.layers[k - 1].self_attn
    grabbed = {}
    hook = attn.k_proj.register_forward_hook(lambda m, i, o: grabbed.__setitem__("k", o))
    try:
        out = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
    finally:
        hook.remove()
    seq = input_ids.shape[1]
    keys = grabbed["k"].view(1, seq, -1, attn.head_dim).transpose(1, 2)  # (1, Hkv, T, D)
    cos, sin = lm.rotary_emb(keys, torch.arange(seq)[None])
    keys, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
    k_states = keys.permute(0, 2, 1, 3).reshape(1, seq, -1)[0]  # (T, Hkv * D)
    last = lm.norm(out.hidden_states[k])[0]  # (T, d)
    ids = input_ids[0]
    img = (ids == model.config.image_token_id).nonzero()[:, 0]
    start, length = int(img[0]), len(img)
    token_topk = int(max_num_truncation // (pivot_image + pivot_text))
    k_img, k_query = k_states[start:start + length], k_states[start + length:]
    image_indices = (torch.norm(k_img, p=1, dim=-1).topk(pivot_image).indices + start).tolist()
    query_indices = (torch.norm(k_query, p=1, dim=-1).topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(start, start + length))
    valid.difference_update(image_indices)
    for item in list(indices_set.copy()):
        valid_list = list(valid)
        cos_sim = -F.cosine_similarity(last[item, :], last[valid_list, :], dim=-1)
        top = [valid_list[i] for i in cos_sim.topk(token_topk).indices.tolist()]
        indices_set.update(top)
        valid.difference_update(top)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)
