"""The testbed's training losses: the forward pass run by hand (the same computation as
`LlavaForConditionalGeneration`, tested), the auxiliary heads (per-patch attributes, locations, the
question's attributes), and the attention losses (salience of object patches, supervised lookup
heads) that make the small model's attention informative enough for pruning to be realistic."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration

from .batches import patch_cells
from .scenes import COLOUR_NAMES, POSITIONS, SHAPES, SIZES


class AuxHeads(nn.Module):
    """Per-patch classifiers (training only): linear heads read each patch feature and predict
    the attributes of the object covering the patch (or background)."""

    def __init__(self, hidden: int, with_cell: bool = False):
        super().__init__()
        self.shape = nn.Linear(hidden, len(SHAPES) + 1)
        self.colour = nn.Linear(hidden, len(COLOUR_NAMES) + 1)
        self.size = nn.Linear(hidden, len(SIZES) + 1)
        self.cell = nn.Linear(hidden, len(POSITIONS) + 1) if with_cell else None

    def loss(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """feats: (B, P, D) patch features; targets: (B, P, 4) int64 (shape, colour, size, cell)
        -> scalar mean cross-entropy over the heads."""
        heads = [self.shape, self.colour, self.size] + ([self.cell] if self.cell is not None else [])
        losses = []
        for k, head in enumerate(heads):
            logits = head(feats).float()  # (B, P, C)
            losses.append(F.cross_entropy(logits.flatten(0, 1), targets[..., k].flatten()))
        return sum(losses) / len(losses)

class Aux(nn.Module):
    """The auxiliary losses: on the tower output (shape, colour, size) and on the projector
    output, i.e. the image embeddings the decoder reads (shape, colour, size and grid cell of the
    covering object), optionally (`with_loc`) the location of every patch on the projector
    output (which of the 3x3 grid cells the patch lies in, background included), and optionally
    (`with_query`) the attributes a question names (shape, colour, size, position words), read
    off the decoder state of the question's last prompt token."""

    def __init__(self, tower_hidden: int, text_hidden: int, with_loc: bool = False, with_query: bool = False):
        super().__init__()
        self.tower = AuxHeads(tower_hidden)
        self.proj = AuxHeads(text_hidden, with_cell=True)
        self.loc = nn.Linear(text_hidden, len(POSITIONS)) if with_loc else None
        self.query = AuxHeads(text_hidden, with_cell=True) if with_query else None

    def loc_loss(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds: (B, P, D) projector output -> cross-entropy of each patch's grid cell."""
        b, p, _ = image_embeds.shape
        logits = self.loc(image_embeds).float()  # (B, P, 9)
        return F.cross_entropy(logits.flatten(0, 1), patch_cells(p).to(logits.device).repeat(b))

def forward_logits(model: LlavaForConditionalGeneration, input_ids, attention_mask, pixel_values, drop=None):
    """The model's forward pass written out, also returning the tower's patch features and the
    projector output. Equals `model(input_ids, pixel_values, attention_mask).logits` (tested).

    drop: None, or (start (B,) long, hidden (B, T) bool): image-token dropout, in which the
    columns `hidden` of row b are invisible as keys in decoder layers >= start[b] (an image token
    still attends itself, as in the engine's mask mode)."""
    return _forward(model, input_ids, attention_mask, pixel_values, drop)[:3]

def _forward(model, input_ids, attention_mask, pixel_values, drop=None):
    """forward_logits, plus the input hidden state of every decoder layer (L tensors (B, T, D);
    autograd keeps them anyway)."""
    tower = model.model.vision_tower(pixel_values)
    feats = tower.last_hidden_state[:, 1:]  # (B, 1+P, Dv) -> (B, P, Dv): drop CLS ('default')
    image_embeds = model.model.multi_modal_projector(feats)  # (B, P, D)
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, D)
    is_image = (input_ids == model.config.image_token_id).unsqueeze(-1)  # (B, T, 1)
    embeds = embeds.masked_scatter(is_image, image_embeds.to(embeds.dtype))
    lm = model.model.language_model
    if drop is None:
        out = lm(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=True)
        hidden, layer_inputs = out.last_hidden_state, out.hidden_states[: len(lm.layers)]
    else:
        hidden, layer_inputs = _decoder_with_dropout(lm, embeds, attention_mask, *drop)
    return model.lm_head(hidden), feats, image_embeds, layer_inputs  # (B, T, V), (B, P, Dv), (B, P, D), L x (B, T, D)

def _decoder_with_dropout(lm, embeds, attention_mask, start, hidden_cols):
    """The Llama decoder layer by layer, with per-layer boolean masks (right padding, so positions
    are 0..T-1). embeds: (B, T, D); attention_mask: (B, T); start: (B,); hidden_cols: (B, T) bool.
    Returns the final normed state and the input state of every layer."""
    b, t = attention_mask.shape
    device = embeds.device
    position_ids = torch.arange(t, device=device)[None].expand(b, t)  # (B, T)
    pos_emb = lm.rotary_emb(embeds, position_ids)
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()  # (T, T)
    base = causal[None] & attention_mask.bool()[:, None, :]  # (B, T_q, T_k)
    eye = torch.eye(t, dtype=torch.bool, device=device)[None]  # (1, T, T): no empty row, self stays visible
    hidden = embeds
    inputs = []
    for i, layer in enumerate(lm.layers):
        inputs.append(hidden)
        gone = hidden_cols & (start <= i)[:, None]  # (B, T) keys invisible in this layer
        allowed = (base & ~gone[:, None, :]) | eye  # (B, T_q, T_k)
        hidden = layer(hidden, attention_mask=allowed[:, None], position_embeddings=pos_emb, position_ids=position_ids)
    return lm.norm(hidden), inputs

def query_attention(lm, layer_inputs, rows, pos, attention_mask, layer: int, heads: int | None = None) -> torch.Tensor:
    """Attention probabilities of the first `heads` heads (all when None) of decoder layer `layer`
    from the queries (rows[i], pos[i]) to every key: (N, H, T) float32, the causal softmax (no
    dropout mask), recomputed from the layer's q/k projections and RoPE (right padding: positions
    0..T-1; GQA: query head h reads key/value head h // (H / KV))."""
    from transformers.models.llama.modeling_llama import rotate_half

    n, t = len(rows), attention_mask.shape[1]
    block = lm.layers[layer]
    attn = block.self_attn
    d = attn.head_dim
    h = heads or attn.config.num_attention_heads
    group = attn.num_key_value_groups
    kv = (h + group - 1) // group  # key/value heads the first h query heads read
    x = block.input_layernorm(layer_inputs[layer][rows])  # (N, T, D)
    at = torch.arange(n)
    proj = lambda p, x_, m: F.linear(x_, p.weight[: m * d], None if p.bias is None else p.bias[: m * d])  # noqa: E731
    q = proj(attn.q_proj, x[at, pos], h).view(n, h, d)  # (N, H, d)
    k = proj(attn.k_proj, x, kv).view(n, t, kv, d).transpose(1, 2)  # (N, T, KV*d) -> (N, KV, T, d)
    k = k.repeat_interleave(group, dim=1)[:, :h]  # (N, H, T, d)
    cos, sin = lm.rotary_emb(x, torch.arange(t)[None].expand(n, t))  # (N, T, d) each
    q = q * cos[at, pos][:, None] + rotate_half(q) * sin[at, pos][:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    scores = (k @ q[..., None])[..., 0].float() * attn.scaling  # (N, H, T)
    visible = (torch.arange(t)[None] <= pos[:, None]) & attention_mask[rows].bool()  # (N, T)
    return scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)  # (N, H, T)

def supervised_attention(lm, layer_inputs, batch: dict, layer: int) -> torch.Tensor:
    """Head 0 of `query_attention` from every question query (batch["q_rows"], batch["q_pos"]): (N, T)."""
    return query_attention(lm, layer_inputs, batch["q_rows"], batch["q_pos"], batch["attention_mask"], layer, heads=1)[:, 0]

def salience_loss(lm, layer_inputs, batch: dict, layer: int, image_token_id: int) -> tuple[torch.Tensor, float]:
    """-log of the share of the image attention that lands on object patches, from the last prompt
    token of every turn (captions included; batch["t_rows"], batch["t_pos"]), with the attention
    averaged over all heads of `layer` as FastV averages it; mean over turns. Only the split
    *within* the image matters (how much goes to the image at all stays free). Training-only: it
    makes the ranking FastV reads at layer K-1 put the objects first, as a real VLM's text-to-image
    attention favours salient content. Returns (loss, mean share)."""
    rows = batch["t_rows"]
    probs = query_attention(lm, layer_inputs, rows, batch["t_pos"], batch["attention_mask"], layer).mean(1)  # (K, T)
    image = probs[batch["input_ids"][rows] == image_token_id].view(len(rows), -1)  # (K, P) patch order
    on_objects = batch["patch_targets"][rows][..., 0] > 0  # (K, P)
    share = (image * on_objects).sum(-1) / image.sum(-1).clamp(min=1e-12)  # (K,)
    return -(share + 1e-6).log().mean(), share.mean().item()

def attention_supervision_loss(lm, layer_inputs, batch: dict, layers, image_token_id: int,
                               sink: bool = False, count: bool = False) -> tuple[torch.Tensor, float]:
    """-log of the attention mass head 0 of each layer in `layers` gives, from a question's last
    prompt token, to the patches of the objects the question names (batch["q_mask"]); mean over
    queries and layers. A question that names no present object (an absent POPE category, a count
    of zero) is left out, or with `sink` it should look at the first token (bos) instead: "nothing
    matches" then has an answer of its own. With `count`, a count question's head should split its
    attention evenly over bos and each counted object (a cross-entropy against that uniform target
    over n + 1 groups; the object's patches pool their mass), so the share left on bos, 1/(n+1),
    says n. Returns (loss, mean mass on the target groups). Training-only: it teaches the decoder
    to *look up* an object by its description, which answer-only training did not find (the lookup
    probe, research/testbed_lookup_probe.py)."""
    rows = batch["q_rows"]
    is_image = batch["input_ids"][rows] == image_token_id  # (N, T)
    none = ~batch["q_mask"].any(-1)  # (N,) questions with no object to look at
    counted = batch["q_count"] & ~none if count else torch.zeros_like(none)  # (N,)
    # (N, P, 9) which counted object (grid cell) each patch belongs to; q_mask has the named ones.
    cells = F.one_hot(batch["patch_targets"][rows][..., 3], 10)[..., 1:] * batch["q_mask"][..., None]
    present = cells.any(1)  # (N, 9) the counted objects
    losses, masses = [], []
    for i in layers:
        probs = supervised_attention(lm, layer_inputs, batch, i)  # (N, T)
        image = probs[is_image].view(len(probs), -1)  # (N, P) image columns in patch order
        on_objects = (image * batch["q_mask"]).sum(-1)  # (N,)
        mass = torch.where(none, probs[:, 0], on_objects)
        per_object = torch.einsum("np,npc->nc", image, cells.to(image.dtype))  # (N, 9)
        even = -((per_object + 1e-6).log() * present).sum(-1) - (probs[:, 0] + 1e-6).log()  # (N,)
        losses.append(torch.where(counted, even / (present.sum(-1) + 1), -(mass + 1e-6).log()))  # n objects + bos
        masses.append(torch.where(counted, mass + probs[:, 0], mass))
    loss, mass = torch.stack(losses), torch.stack(masses)  # (layers, N)
    if not sink:
        keep = ~none
        loss, mass = loss[:, keep], mass[:, keep]
    return loss.mean(), mass.mean().item()

def compute_loss(model, aux: Aux, batch: dict, aux_weight: float, proj_aux_weight: float = 0.0, drop=None,
                 loc_aux_weight: float = 0.0, attn_sup_weight: float = 0.0,
                 attn_sup_layers: tuple[int, ...] = (2, 3), query_aux_weight: float = 0.0,
                 attn_sup_sink: bool = False, attn_sup_count: bool = False, salience_weight: float = 0.0,
                 salience_layer: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """Response-token cross-entropy averaged per example, then over the batch (so a one-word
    answer weighs as much as a 40-word caption; a plain token mean would give short answers
    about 10% of the gradient), plus the weighted auxiliary patch losses (tower, projector and
    patch location), the attention supervision, the question-attribute loss and the salience loss."""
    logits, feats, image_embeds, layer_inputs = _forward(
        model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], drop
    )
    # Next-token prediction: position t predicts labels[t + 1].
    targets = batch["labels"][:, 1:]  # (B, T-1)
    token_ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )  # (B, V, T-1) vs (B, T-1) -> (B, T-1)
    n_tokens = (targets != -100).sum(1).clamp(min=1)  # (B,)
    lm = (token_ce.sum(1) / n_tokens).mean()
    loss = lm
    parts = {"lm": lm.item()}
    if aux_weight > 0:
        aux_loss = aux.tower.loss(feats, batch["patch_targets"])
        loss = loss + aux_weight * aux_loss
        parts["aux"] = aux_loss.item()
    if proj_aux_weight > 0:
        proj_loss = aux.proj.loss(image_embeds, batch["patch_targets"])
        loss = loss + proj_aux_weight * proj_loss
        parts["proj_aux"] = proj_loss.item()
    if loc_aux_weight > 0:
        loc_loss = aux.loc_loss(image_embeds)
        loss = loss + loc_aux_weight * loc_loss
        parts["loc_aux"] = loc_loss.item()
    if attn_sup_weight > 0 and (attn_sup_sink or bool(batch["q_mask"].any())):
        sup_loss, mass = attention_supervision_loss(
            model.model.language_model, layer_inputs, batch, attn_sup_layers, model.config.image_token_id, attn_sup_sink, attn_sup_count
        )
        loss = loss + attn_sup_weight * sup_loss
        parts["attn_sup"], parts["attn_mass"] = sup_loss.item(), mass
    if query_aux_weight > 0 and len(batch["q_rows"]):
        # The state entering the first supervised layer, where the lookup's query is formed.
        state = layer_inputs[min(attn_sup_layers)][batch["q_rows"], batch["q_pos"]]  # (M, D)
        state = F.rms_norm(state, state.shape[-1:])  # as the layer reads it (its norm's weights aside)
        query_loss = aux.query.loss(state[None], batch["q_targets"][None])
        loss = loss + query_aux_weight * query_loss
        parts["query_aux"] = query_loss.item()
    if salience_weight > 0 and len(batch["t_rows"]):
        sal_loss, share = salience_loss(model.model.language_model, layer_inputs, batch, salience_layer, model.config.image_token_id)
        loss = loss + salience_weight * sal_loss
        parts["salience"], parts["salience_share"] = sal_loss.item(), share
    parts["loss"] = loss.item()
    return loss, parts
