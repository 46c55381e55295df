"""The teacher-forced pass: one prompt + response through the frozen VLM, and the soft-masked pass
of layers >= K that training differentiates (docs/design.md, "Training").

`prepare` runs layers 0..K-1 and the full model once per sequence and keeps what does not depend on
the predictor (the hidden states entering layer K, every response step's probe row, the full
model's next-token distributions); `pruned_logprobs` then runs layers >= K under a soft mask. With
one-hot bin probabilities and eps = 0 it is exactly the engine's `mask` mode (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..adapters import IMG, RES, adapter_for
from ..adapters.inputs import encode
from ..errors import InputError
from .soft_mask import ranks, soft_mask


@dataclass
class Cached:
    """One teacher-forced sequence with everything that does not depend on the predictor.

    L columns = P prompt tokens + T-1 response tokens (the last response token is only a target)."""

    hidden: torch.Tensor  # (1, L, d) hidden states after layer K-1
    probe: torch.Tensor  # (T, L) float32, head-averaged attention at layer K-1 of queries P-1 .. P+T-2
    img_cols: torch.Tensor  # (N_img,) long, image columns
    groups: torch.Tensor  # (L,) long group of each column
    n_prompt: int  # P
    teacher: torch.Tensor  # (T, V) float32 log-probabilities of the full model
    response: list[int] = field(default_factory=list)  # the T response tokens (step t predicts response[t])
    oracle: torch.Tensor | None = None  # (T,) long oracle bins (objective "oracle" only)
    bin_kl: torch.Tensor | None = None  # (T, bins) KL to the full model at each hard bin (oracle only)
    bin_kl_rank: str = "step"  # the ranking bin_kl was computed with
    positions: torch.Tensor | None = None  # (A, 1, L) long RoPE positions (None: 0..L-1 on one axis)

    @property
    def n_steps(self) -> int:
        return self.probe.shape[0]


def _causal(length: int, device, dtype=torch.float32) -> torch.Tensor:
    """(L, L) additive causal mask: 0 on and below the diagonal, -inf above."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)


def _probe_rows(layer, hidden: torch.Tensor, pos_emb, mask: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities (L, L) float32 of every query of a Llama-style layer."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    b, n, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)  # (1, H, L, D)
    k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)  # (1, Hkv, L, D)
    cos, sin = pos_emb
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (1, H, L, D)
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling + mask.float()
    return scores.softmax(-1).mean(1)[0]  # (L, L)


@torch.no_grad()
def prepare(model, processor, image, prompt: str, response: list[int], k: int) -> Cached:
    """Run layers 0..K-1 and the full model once on prompt + response; cache what training needs."""
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    batch = encode(processor, [image], [prompt], device)
    prompt_ids = batch.input_ids  # (1, P)
    n_prompt, n_steps = prompt_ids.shape[1], len(response)
    if n_steps < 1:
        raise InputError("empty response")
    ids = torch.cat([prompt_ids, torch.tensor([response[:-1]], device=device, dtype=torch.long)], dim=1)  # (1, L)
    length = ids.shape[1]
    groups = adapter.token_groups(prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool))[0]
    groups = torch.cat([groups, groups.new_full((n_steps - 1,), RES)])  # (L,)
    hidden = adapter.embed(ids, batch.vision)  # (1, L, d)
    prompt_pos = adapter.positions(prompt_ids, batch.attention_mask, batch.vision)  # (A, 1, P)
    steps = torch.arange(1, n_steps, device=device)  # response tokens 0..T-2 follow the prompt's last position
    positions = torch.cat([prompt_pos, prompt_pos[..., -1:] + steps], dim=2)  # (A, 1, L)
    position_ids = positions[0]  # (1, L)
    pos_emb = adapter.rotary(hidden, positions)
    mask = _causal(length, device, hidden.dtype)[None, None]  # (1, 1, L, L)
    probe = None
    for i in range(adapter.n_layers):
        if i == k - 1:
            probe = _probe_rows(adapter.layers[i], hidden, pos_emb, mask[0, 0])[n_prompt - 1:]  # (T, L)
        hidden = adapter.layers[i](hidden, attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids)
        if i == k - 1:
            hidden_k = hidden
    teacher = adapter.logits(hidden)[0, n_prompt - 1:].log_softmax(-1)  # (T, V)
    img_cols = (groups == IMG).nonzero()[:, 0]
    return Cached(hidden_k.cpu(), probe.cpu(), img_cols.cpu(), groups.cpu(), n_prompt, teacher.cpu(), list(response),
                  positions=positions.cpu())


def shares_of(c: Cached) -> torch.Tensor:
    """(T, 4) share vector (sys, img, ins, res) of every response step."""
    onehot = F.one_hot(c.groups, 5)[:, :4].float()  # (L, 4)
    return c.probe @ onehot


def step_hidden(c: Cached) -> torch.Tensor:
    """(T, d) hidden state after layer K-1 of every response step's query (the `hidden` feature)."""
    return c.hidden[0, c.n_prompt - 1 : c.n_prompt - 1 + c.n_steps]


def pruned_logprobs(model, c: Cached, p: torch.Tensor, bank: torch.Tensor, k: int, eps: float,
                    rank_by: str = "step") -> torch.Tensor:
    """Layers >= K under the soft mask of bin probabilities p (T, B): log-probabilities (T, V).
    rank_by: "step" (each query's probe ranks the image tokens) or "prefill" (the last prompt
    token's, for every query)."""
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    hidden = c.hidden.to(device)
    length, n_prompt = hidden.shape[1], c.n_prompt
    img = c.img_cols.to(device)
    scores = c.probe.to(device)[:, img]  # (T, N_img) each step's probe
    if rank_by == "prefill":
        scores = scores[:1].expand_as(scores)  # every step ranks by the prefill's probe
    rank = ranks(scores)  # (T, N_img)
    m = soft_mask(p.to(device), rank, bank.to(device))  # (T, N_img)
    step_of = (torch.arange(length, device=device) - (n_prompt - 1)).clamp(min=0)  # (L,) step of each query
    bias = torch.log(m + eps)  # (T, N_img)
    add = torch.zeros(length, length, device=device, dtype=m.dtype)
    add[:, img] = bias[step_of]  # (L, N_img): prompt queries use the step-0 mask
    add[img, img] = 0.0  # an image token always sees itself (engine: the query's own slot)
    mask = (_causal(length, device) + add).to(hidden.dtype)[None, None]  # (1, 1, L, L)
    positions = c.positions.to(device) if c.positions is not None else torch.arange(length, device=device)[None, None]
    pos_emb = adapter.rotary(hidden, positions)  # positions: (A, 1, L)
    for i in range(k, adapter.n_layers):
        hidden = adapter.layers[i](hidden, attention_mask=mask, position_embeddings=pos_emb, position_ids=positions[0])
    return adapter.logits(hidden)[0, n_prompt - 1:].log_softmax(-1)  # (T, V)
