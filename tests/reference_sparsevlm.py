"""An independent restatement of SparseVLM (v1) in its authors' code structure (Gumpest/SparseVLMs,
`LlamaDynamicvitModel.forward`, `attn_postprocess_topk`, `cluster_and_merge`), read not copied:
one unpadded LLaVA row, no cache, every step recomputes the whole sequence layer by layer (eager
attention from the module weights, tests/reference.py), the hidden states shrinking at each
pruning layer. It shares no code with dyrate's policy. dyrate's documented deviations are applied
(docs/methods.md): original positions kept, a merged token at its cluster centre's place, no
density noise, a budget that holds every token leaves the stage alone."""

from __future__ import annotations

import math

import torch

from reference import _image_features, _layer


def select_raters(v_t: torch.Tensor, t_t: torch.Tensor) -> torch.Tensor:
    """Their 'Select Text Raters': indices (into t_t) of the text tokens whose mean softmax
    relation to the image tokens is above the mean."""
    m_v_t = v_t.float() @ t_t.float().transpose(0, 1)  # (576, 53)
    m_v_t = m_v_t.softmax(1).mean(0)  # (53,)
    return torch.where(m_v_t > m_v_t.mean())[0]


def index_points(points, idx):
    batch = torch.arange(points.shape[0])[:, None].expand_as(idx)
    return points[batch, idx, :]


def cluster_and_merge(x: torch.Tensor, cluster_num: int):
    """Their DPC-kNN clustering, batch form (B, N, C), without the 1e-6 density noise. Returns the
    centre indices (B, cluster_num) and the merged tokens (B, cluster_num, C)."""
    b, n, c = x.shape
    x = x.float()
    x1, x2 = x[:, :, None, :], x[:, None, :, :]
    dist_matrix = (x1 - x2).norm(dim=-1, p=2) / (c ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dist_matrix = index_points(dist_matrix, index_down)
    idx_cluster = dist_matrix.argmin(dim=1)
    idx_batch = torch.arange(b)[:, None].expand(b, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(b, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    idx = idx_cluster + torch.arange(b)[:, None] * cluster_num
    token_weight = x.new_ones(b, n, 1)
    all_weight = token_weight.new_zeros(b * cluster_num, 1)
    all_weight.index_add_(0, idx.reshape(b * n), token_weight.reshape(b * n, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(b * cluster_num, c)
    x_merged.index_add_(0, idx.reshape(b * n), (x * norm_weight).reshape(b * n, c))
    return index_down, x_merged.reshape(b, cluster_num, c)


def keep_count(r: float, n: int) -> int:
    return int(math.ceil(round((1 - r) * n, 6)))


@torch.no_grad()
def sparsevlm_generate(model, input_ids, pixel_values, stages, recycle: float, per_cluster: int,
                       max_new_tokens: int, eos: int):
    """Greedy tokens and, per stage, the image columns kept after it (a merged token counted at its
    centre's column). stages: ((K, R), ...) with their pruning layer K - 1."""
    lm = model.model.language_model
    image_id = model.config.image_token_id
    ids = input_ids[0].tolist()
    img_cols = [c for c, tok in enumerate(ids) if tok == image_id]
    v_token_start, image_shape = img_cols[0], len(img_cols)
    prompt_emb = lm.embed_tokens(input_ids[0]).clone()
    prompt_emb[torch.tensor(img_cols)] = _image_features(model, {"pixel_values": pixel_values})
    t_token_idx = select_raters(prompt_emb[v_token_start:v_token_start + image_shape],
                                prompt_emb[v_token_start + image_shape:])
    pruning_loc = {k - 1: i for i, (k, _) in enumerate(stages)}
    new_tokens: list[int] = []
    kept_after: list[list[int]] = []
    for _ in range(max_new_tokens):
        seq = ids + new_tokens
        h = torch.cat([prompt_emb, lm.embed_tokens(torch.tensor(new_tokens, dtype=torch.long))]) if new_tokens else prompt_emb
        cols = torch.arange(len(seq))  # original column (= position) of each current token
        v_token_num = image_shape
        kept_now = []
        for layer_idx, layer in enumerate(lm.layers):
            n_t = h.shape[0]
            causal = torch.ones(n_t, n_t, dtype=torch.bool).tril()
            probs = [] if layer_idx in pruning_loc else None
            h = _layer(layer, h, cols, lm.rotary_emb, causal, probs_out=probs)
            if probs is None:
                continue
            text_token_start = v_token_start + v_token_num
            attn = probs[0].mean(0)  # (T, T), heads averaged
            relation_vis_text = attn[t_token_idx + text_token_start, v_token_start:text_token_start].mean(0)
            budget = keep_count(stages[pruning_loc[layer_idx]][1], image_shape)
            if budget >= v_token_num:
                kept_now.append(cols[v_token_start:text_token_start].tolist())
                continue
            keep_vis = torch.zeros(v_token_num, dtype=torch.bool)
            keep_vis[torch.topk(relation_vis_text, budget).indices] = True
            new_vis = h[v_token_start:text_token_start].clone()
            if recycle > 0:
                deleted = torch.where(~keep_vis)[0]
                n_rec = min(int(len(deleted) * recycle) + 1, len(deleted))
                stage2 = deleted[relation_vis_text[deleted].topk(n_rec).indices]
                cluster_num = min(int(n_rec / per_cluster) + 1, n_rec)
                centres, merged = cluster_and_merge(h[v_token_start + stage2][None], cluster_num)
                centre_tokens = stage2[centres[0]]
                keep_vis[centre_tokens] = True  # the merged token sits at its centre's place
                new_vis[centre_tokens] = merged[0].to(h.dtype)
            vis_cols = cols[v_token_start:text_token_start][keep_vis]
            h = torch.cat([h[:v_token_start], new_vis[keep_vis], h[text_token_start:]])
            cols = torch.cat([cols[:v_token_start], vis_cols, cols[text_token_start:]])
            v_token_num = int(keep_vis.sum())
            kept_now.append(vis_cols.tolist())
        if not kept_after:
            kept_after = kept_now
        logits = model.lm_head(lm.norm(h[-1:]))[0]
        nxt = int(logits.argmax())
        new_tokens.append(nxt)
        if nxt == eos:
            break
    return new_tokens, kept_after
