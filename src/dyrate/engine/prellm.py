"""The pre-LLM stage (docs/design.md, "Stages"): a policy reduces each image's tokens before the
decoder, so every decoder layer sees fewer image tokens.

`shrink_prompt` asks the policy for each image's `Reduction` and builds the shorter prompt: the
text tokens as they were, each image's n tokens replaced by the m reduced ones, rows left padded
again. Positions: the policy's `positions` field -- "renumber" numbers the shorter sequence
afresh, as the methods' own code does on LLaVA (they hand the language model fewer image
features); "keep" gives every token its original position (a reduced token takes its anchor's),
as in-LLM pruning does. Unset: renumber on 1-D RoPE families, keep on M-RoPE ones (Qwen2-VL),
whose image positions are a 2-D grid that cannot be renumbered."""

from __future__ import annotations

import torch

from ..adapters import ModelAdapter
from ..errors import InputError
from ..policies import PreLLMPolicy


def shrink_prompt(adapter: ModelAdapter, policy: PreLLMPolicy, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  vision) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """input_ids, attention_mask: (B, P) left padded. Returns the new ids and mask (B, P'), positions
    (A, B, P'), input embeddings (B, P', d), each row's image tokens before reduction (B,) and each
    image's tokens after it (in batch order)."""
    views = adapter.image_views(vision, tower=policy.reads_tower)
    reductions = [policy.reduce(view) for view in views]
    for view, red in zip(views, reductions):
        if red.features.shape[0] < 1:
            raise InputError(f"{policy.spec()}: reduced an image to no tokens")
    image_id = adapter.image_token_id
    pos_full = adapter.positions(input_ids, attention_mask, vision)  # (A, B, P)
    rule = getattr(policy, "positions", None) or ("renumber" if pos_full.shape[0] == 1 else "keep")
    if rule == "renumber" and pos_full.shape[0] > 1:
        raise InputError(f"{policy.spec()}: positions=renumber needs 1-D RoPE; this model's M-RoPE positions "
                         "(an image grid) can only be kept (positions=keep)")
    renumber = rule == "renumber"
    b = input_ids.shape[0]
    rows, n_img_full, image = [], [], 0
    for row in range(b):
        valid = attention_mask[row].bool()
        ids, pos = input_ids[row][valid], pos_full[:, row][:, valid]  # (L,), (A, L)
        img_cols = (ids == image_id).nonzero()[:, 0]
        n_img_full.append(len(img_cols))
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[img_cols] = False
        pieces = []  # (sort key, ids, positions, features or None) in sequence order
        start = 0
        while start < len(img_cols):  # this row's images, in order: each is its view's n tokens
            view, red = views[image], reductions[image]
            cols = img_cols[start:start + view.n]
            m = red.features.shape[0]
            pieces.append((int(cols[0]), torch.full((m,), image_id, dtype=ids.dtype, device=ids.device),
                           pos[:, cols[red.anchors.to(cols.device)]], red.features))
            start += view.n
            image += 1
        text_cols = keep.nonzero()[:, 0]
        for c in text_cols.tolist():
            pieces.append((c, ids[c:c + 1], pos[:, c:c + 1], None))
        pieces.sort(key=lambda piece: piece[0])  # stable: an image sits where its first token was
        rows.append(pieces)
    if image != len(views):
        raise InputError(f"the prompts hold {image} images' tokens but {len(views)} images were given")
    lengths = [sum(len(piece[1]) for piece in pieces) for pieces in rows]
    width = max(lengths)
    a = pos_full.shape[0]
    new_ids = input_ids.new_full((b, width), 0)
    new_mask = attention_mask.new_zeros((b, width))
    new_pos = pos_full.new_zeros((a, b, width))
    feats = []
    for row, pieces in enumerate(rows):
        ids = torch.cat([piece[1] for piece in pieces])
        pad = width - len(ids)
        new_ids[row, pad:] = ids
        new_mask[row, pad:] = 1
        new_pos[:, row, pad:] = torch.arange(len(ids), device=ids.device) if renumber else torch.cat(
            [piece[2] for piece in pieces], dim=1)
        feats.extend(piece[3] for piece in pieces if piece[3] is not None)
    hidden = adapter.embed_tokens(new_ids)  # (B, P', d)
    slots = (new_ids == image_id) & new_mask.bool()
    hidden = hidden.masked_scatter(slots.unsqueeze(-1), torch.cat(feats).to(hidden.dtype))
    counts = [red.features.shape[0] for red in reductions]
    return new_ids, new_mask, new_pos, hidden, torch.tensor(n_img_full, device=input_ids.device), counts
