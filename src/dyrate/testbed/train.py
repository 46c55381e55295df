"""Train the testbed LLaVA from scratch on the procedural scene mixture.

The loop reads top to bottom: build a batch (deterministic from seed and step), run the vision
tower, projector and decoder by hand (the same computation as `LlavaForConditionalGeneration`,
tests check it), add an auxiliary per-patch loss on the vision tower, step AdamW.

Loss = cross-entropy on response tokens only + `aux_weight` x per-patch attribute loss: a small
head reads each patch feature of the tower's output and predicts the (shape, colour, size) of
the object covering the patch (or background). It gives the tower a direct signal about shapes,
which a prototype trained on the caption loss alone never learned (shape stayed at chance).
The head is training-only and is not part of the exported model.

Checkpoints: `OUT/train_state/` holds `model.safetensors` (fp32 weights + aux head),
`optimizer.safetensors` (AdamW moments) and `state.json` (step, elapsed time, arguments);
no pickle anywhere. Rerunning the same command resumes from it. Every invocation ends by
exporting an ordinary HF checkpoint into OUT (fp16 weights + processor).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaForConditionalGeneration

from ..errors import CheckpointError, InputError
from .configs import build_config, get_spec
from .data import parse_task_weights, sample_example, train_scene_seed
from .language import PLURALS, named_objects, question_type, words_of
from .processing import EOS, IMAGE, build_processor, pixel_values
from .scenes import COLOUR_NAMES, POSITIONS, SHAPES, SIZES, patch_labels, render

STATE_DIR = "train_state"


@dataclass
class TrainArgs:
    config: str = "base"
    out: str = "runs/testbed"
    steps: int | None = None  # total optimizer steps (over all resumed invocations)
    minutes: float | None = None  # total training wall time (over all resumed invocations)
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    vision_lr_mult: float = 2.0  # the tower learns from scratch through a long path: give it more
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_frac: float = 0.1
    aux_weight: float = 0.5
    proj_aux_weight: float = 0.5  # per-patch loss on the projector output, with the grid cell
    loc_aux_weight: float = 0.0  # per-patch loss on the projector output: the patch's own 3x3 cell (all patches)
    init: str | None = None  # start from the weights of another run (OUT of an earlier train)
    drop_prob: float = 0.0  # image-token dropout: fraction of examples that get it (see sample_dropout)
    drop_max_rate: float = 0.9  # ... and the largest fraction of image tokens hidden
    drop_background_first: float = 0.0  # ... and the fraction of those that hide background patches first
    task_weights: str | None = None  # e.g. "caption=0.2,qa=0.5,pope=0.3" (default: data.TASK_WEIGHTS)
    attn_sup_weight: float = 0.0  # attention supervision (see attention_supervision_loss), 0 = off
    attn_sup_layers: tuple[int, ...] = (2, 3)  # ... the decoder layers whose head 0 it supervises
    attn_sup_sink: bool = False  # ... and questions naming no present object should look at bos
    attn_sup_count: bool = False  # ... and count questions split it evenly over bos and each counted object
    query_aux_weight: float = 0.0  # per-question loss: the question's attributes, read off its last prompt token
    salience_weight: float = 0.0  # per-turn loss: every head of --salience-layer looks at the objects (see salience_loss)
    salience_layer: int = 1  # ... the decoder layer (1 = the layer FastV ranks by at K=2)
    bf16: bool | None = None  # bf16 autocast; None: only where the CPU has native bf16 (else it is ~20x slower)
    save_every_s: float = 300.0
    log_every: int = 10
    progress: bool = True
    stop_after_steps: int | None = None  # end this invocation early (tests; time-sliced runs)

    def validate(self) -> None:
        get_spec(self.config)
        if self.steps is None and self.minutes is None:
            raise InputError("give --steps, --minutes or both (training stops at whichever comes first)")
        if self.steps is not None and self.steps <= 0:
            raise InputError(f"--steps must be positive, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise InputError(f"--minutes must be positive, got {self.minutes}")
        if self.batch_size <= 0:
            raise InputError(f"--batch-size must be positive, got {self.batch_size}")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if min(self.aux_weight, self.proj_aux_weight, self.loc_aux_weight) < 0:
            raise InputError("--aux-weight, --proj-aux-weight and --loc-aux-weight must be >= 0, got "
                             f"{self.aux_weight}, {self.proj_aux_weight}, {self.loc_aux_weight}")
        if not 0 <= self.drop_prob <= 1 or not 0 <= self.drop_max_rate < 1 or not 0 <= self.drop_background_first <= 1:
            raise InputError(
                f"--drop-prob and --drop-background-first must lie in [0, 1] and --drop-max-rate in [0, 1), "
                f"got {self.drop_prob}, {self.drop_background_first}, {self.drop_max_rate}"
            )
        if self.task_weights is not None:
            parse_task_weights(self.task_weights)
        if self.attn_sup_weight < 0 or self.query_aux_weight < 0:
            raise InputError(f"--attn-sup-weight and --query-aux-weight must be >= 0, got {self.attn_sup_weight}, {self.query_aux_weight}")
        n_layers = get_spec(self.config).text_layers
        if max(self.attn_sup_weight, self.query_aux_weight) > 0 and (not self.attn_sup_layers or any(not 0 <= i < n_layers for i in self.attn_sup_layers)):
            raise InputError(f"--attn-sup-layers {list(self.attn_sup_layers)}: give decoder layers in 0..{n_layers - 1}")
        if self.salience_weight < 0:
            raise InputError(f"--salience-weight must be >= 0, got {self.salience_weight}")
        if self.salience_weight > 0 and not 0 <= self.salience_layer < n_layers:
            raise InputError(f"--salience-layer {self.salience_layer}: give a decoder layer in 0..{n_layers - 1}")
        if (self.attn_sup_sink or self.attn_sup_count) and self.attn_sup_weight == 0:
            raise InputError("--attn-sup-sink and --attn-sup-count shape the attention supervision: give --attn-sup-weight > 0 too")
        if self.init is not None and not any((Path(self.init) / f).is_file() for f in (f"{STATE_DIR}/model.safetensors", "config.json")):
            raise InputError(f"--init {self.init}: neither a training state ({STATE_DIR}/model.safetensors) nor a checkpoint "
                             "(config.json) there (give the --out of an earlier run or an exported model)")

    def use_bf16(self) -> bool:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported() if self.bf16 is None else self.bf16


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


def question_targets(question: str) -> list[int]:
    """The attributes a question names, as the aux heads' targets: (shape, colour, size, position),
    each 0 if the question names none, else 1 + index (plural shapes count as the shape)."""
    words = words_of(question)

    def first(names, alias=None) -> int:
        for w in words:
            w = (alias or {}).get(w, w)
            if w in names:
                return names.index(w) + 1
        return 0

    return [first(SHAPES, {p: s for s, p in PLURALS.items()}), first(COLOUR_NAMES), first(SIZES), first(POSITIONS)]


def patch_cells(num_patches: int) -> torch.Tensor:
    """(P,) int64: the 3x3 grid cell (row-major, as POSITIONS) of each patch of a square grid of
    P patches in row-major order."""
    g = math.isqrt(num_patches)
    idx = torch.arange(num_patches)
    return (idx // g) * 3 // g * 3 + (idx % g) * 3 // g


class BatchBuilder:
    """Turns examples into padded tensors: ids = bos sys 'user :' <image>*N question
    'assistant :' answer eos [then, for a dialog, 'user :' question 'assistant :' answer eos per
    later turn, as the chat template writes a conversation]; labels are -100 except on answers
    and their eos. Also the queries of the question losses: for every question turn (not
    captions) its last prompt token, the attributes the question names (`question_targets`) and
    the patches of the objects it names (`language.named_objects`; none for an absent POPE
    category or a count of zero); and for the salience loss the last prompt token of every turn,
    captions included (t_rows, t_pos)."""

    def __init__(self, processor, config_name: str, task_weights: dict[str, float] | None = None):
        self.spec = get_spec(config_name)
        self.task_weights = task_weights
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids(IMAGE)
        self.eos_id = self.tok.convert_tokens_to_ids(EOS)
        self.pad_id = self.tok.pad_token_id
        system, rest = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}], add_generation_prompt=True).split(IMAGE)
        # ids before the image (with bos) and the words between question and answer.
        self.head_ids = self.tok(system)["input_ids"]
        self.tail_ids = self.tok(rest.replace("Q", "", 1), add_special_tokens=False)["input_ids"]  # 'assistant :'
        self.user_ids = self.tok(system.split("\n")[-1], add_special_tokens=False)["input_ids"]  # 'user :'

    def encode(self, question: str, answer: str, more: tuple[tuple[str, str], ...] = ()) -> tuple[list[int], list[int], list[int]]:
        """-> (ids, labels, the index of each turn's last prompt token)."""
        ids = self.head_ids + [self.image_id] * self.spec.num_image_tokens
        labels = [-100] * len(ids)
        ends = []
        for k, (question_, answer_) in enumerate(((question, answer), *more)):
            q = (self.user_ids if k else []) + self.tok(question_, add_special_tokens=False)["input_ids"] + self.tail_ids
            a = self.tok(answer_, add_special_tokens=False)["input_ids"] + [self.eos_id]
            ids += q
            ends.append(len(ids) - 1)
            ids += a
            labels += [-100] * len(q) + a
        return ids, labels, ends

    def build(self, scene_seeds: list[int]) -> dict[str, torch.Tensor]:
        ids, labels, images, targets = [], [], [], []
        q_rows, q_pos, q_targets, q_mask, q_count = [], [], [], [], []
        t_rows, t_pos = [], []
        for b, s in enumerate(scene_seeds):
            ex = sample_example(s, self.task_weights)
            image, label_map = render(ex.scene, self.spec.image_size, with_labels=True)
            i, l, ends = self.encode(ex.question, ex.answer, ex.more)
            ids.append(i)
            labels.append(l)
            images.append(image)
            targets.append(torch.from_numpy(patch_labels(ex.scene, label_map, self.spec.patch_size)))
            for (question, _), end in zip(((ex.question, ex.answer), *ex.more), ends):
                t_rows.append(b)
                t_pos.append(end)
                if question_type(question) is None:  # a caption prompt
                    continue
                cells = [o.cell + 1 for o in named_objects(ex.scene, question)]
                q_rows.append(b)
                q_pos.append(end)
                q_targets.append(question_targets(question))
                q_mask.append(torch.isin(targets[-1][:, 3], torch.tensor(cells, dtype=torch.long)))  # (P,) named objects' patches
                q_count.append(question_type(question) == "count")
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)  # right padding
        label_t = torch.full((len(ids), width), -100, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, (i, l) in enumerate(zip(ids, labels)):
            input_ids[b, : len(i)] = torch.tensor(i)
            label_t[b, : len(l)] = torch.tensor(l)
            mask[b, : len(i)] = 1
        return {
            "input_ids": input_ids,  # (B, T)
            "attention_mask": mask,  # (B, T)
            "labels": label_t,  # (B, T)
            "pixel_values": pixel_values(images, self.spec.image_size),  # (B, 3, S, S)
            "patch_targets": torch.stack(targets),  # (B, P, 4)
            "q_rows": torch.tensor(q_rows, dtype=torch.long),  # (M,) example of each question turn
            "q_pos": torch.tensor(q_pos, dtype=torch.long),  # (M,) its last prompt token
            "q_targets": torch.tensor(q_targets, dtype=torch.long).view(-1, 4),  # (M, 4) see question_targets
            "q_mask": torch.stack(q_mask) if q_mask else torch.zeros(0, len(targets[0]), dtype=torch.bool),  # (M, P)
            "q_count": torch.tensor(q_count, dtype=torch.bool),  # (M,) count questions
            "t_rows": torch.tensor(t_rows, dtype=torch.long),  # (K,) example of every turn, captions included
            "t_pos": torch.tensor(t_pos, dtype=torch.long),  # (K,) its last prompt token
        }


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


def sample_dropout(input_ids, image_token_id: int, n_layers: int, args: "TrainArgs", step: int, background=None):
    """Image-token dropout for one batch, a pure function of (seed, step): each example with
    probability `drop_prob` hides a uniform fraction in [0, drop_max_rate) of its image tokens
    from a random layer in 1..n_layers-1 on. Which tokens: uniformly random ones, or, for a
    fraction `drop_background_first` of those examples, background patches first (random among
    them; objects only once the background is used up), as a pruner that keeps the informative
    tokens would. background: (B, P) bool, True where no object covers the patch (needed for the
    second kind). Returns (start (B,), hidden_cols (B, T) bool) or None."""
    if args.drop_prob <= 0:
        return None
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    b = input_ids.shape[0]
    on = torch.rand(b, generator=gen) < args.drop_prob  # (B,)
    rate = torch.rand(b, generator=gen) * args.drop_max_rate  # (B,)
    start = torch.randint(1, n_layers, (b,), generator=gen)  # (B,) in 1..L-1
    is_image = (input_ids == image_token_id).cpu()  # (B, T)
    u = torch.rand(is_image.shape, generator=gen)  # (B, T)
    hidden_cols = u < rate[:, None]  # uniformly random kind
    structured = torch.rand(b, generator=gen) < args.drop_background_first  # (B,)
    if background is not None and bool(structured.any()):
        is_object = torch.zeros_like(is_image)
        is_object[is_image] = ~background.cpu().flatten()  # image columns in patch order (P per row)
        key = u + 2.0 * is_object.float() + 4.0 * (~is_image).float()  # background first, then objects
        rank = torch.empty_like(u, dtype=torch.long).scatter_(
            1, key.argsort(1), torch.arange(u.shape[1]).expand(b, -1).contiguous()
        )  # (B, T) position of each column in that order
        n_hide = (rate * is_image.sum(1)).round().long()  # (B,)
        hidden_cols = torch.where(structured[:, None], rank < n_hide[:, None], hidden_cols)
    hidden_cols &= is_image & on[:, None]
    return start.to(input_ids.device), hidden_cols.to(input_ids.device)


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


def lr_factor(step: int, progress: float, args: TrainArgs) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from 1 to `min_lr_frac` over progress
    in [0, 1] (the fraction of --steps or --minutes used, whichever is further along)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.min_lr_frac + (1 - args.min_lr_frac) * cos


def make_optimizer(model, aux: Aux, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW with two learning rates (vision tower + aux head higher) and no decay on
    biases, norms and embeddings of size-1 dims."""
    groups: dict[tuple[float, float], list] = {}
    named = [(f"model.{n}", p) for n, p in model.named_parameters()] + [(f"aux.{n}", p) for n, p in aux.named_parameters()]
    for name, p in named:
        mult = args.vision_lr_mult if ("vision_tower" in name or name.startswith("aux.")) else 1.0
        decay = args.weight_decay if p.ndim >= 2 and "embed" not in name else 0.0
        groups.setdefault((mult, decay), []).append(p)
    param_groups = [{"params": ps, "lr_mult": m, "weight_decay": d, "lr": args.lr * m} for (m, d), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)


# ---------------------------------------------------------------- checkpoints


def _named_params(model, aux) -> dict[str, torch.Tensor]:
    out = {f"model.{n}": p for n, p in model.named_parameters()}
    out.update({f"aux.{n}": p for n, p in aux.named_parameters()})
    return out


def save_state(out: Path, model, aux, opt: torch.optim.AdamW, state: dict) -> None:
    """Write OUT/train_state atomically (tmp dir, then rename)."""
    final = out / STATE_DIR
    tmp = out / (STATE_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = _named_params(model, aux)
    save_file({n: p.detach().contiguous() for n, p in params.items()}, str(tmp / "model.safetensors"))
    moments, steps = {}, {}
    by_id = {id(p): n for n, p in params.items()}
    for p, st in opt.state.items():
        n = by_id[id(p)]
        moments[f"{n}.exp_avg"] = st["exp_avg"].contiguous()
        moments[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
        steps[n] = float(st["step"])
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "adam_steps": steps}, indent=1))
    old = out / (STATE_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_state(out: Path, model, aux, opt: torch.optim.AdamW) -> dict | None:
    """Restore weights and optimizer from OUT/train_state; None if there is none."""
    d = out / STATE_DIR
    if not (d / "state.json").exists():
        return None
    try:
        state = json.loads((d / "state.json").read_text())
        weights = load_file(str(d / "model.safetensors"))
        moments = load_file(str(d / "optimizer.safetensors"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{d} is not a usable training state: {err}") from err
    params = _named_params(model, aux)
    missing = set(params) - set(weights)
    if missing:
        raise CheckpointError(f"{d}: training state lacks {len(missing)} tensors (e.g. {sorted(missing)[0]})")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != weights[n].shape:
                raise CheckpointError(f"{d}: {n} has shape {tuple(weights[n].shape)}, model wants {tuple(p.shape)}")
            p.copy_(weights[n])
    for n, p in params.items():
        if n in state["adam_steps"]:
            opt.state[p] = {
                "step": torch.tensor(state["adam_steps"][n]),
                "exp_avg": moments[f"{n}.exp_avg"].clone(),
                "exp_avg_sq": moments[f"{n}.exp_avg_sq"].clone(),
            }
    return state


def init_from(run: Path, model, aux) -> dict[str, int]:
    """Copy the weights of an earlier run's training state (or, without one, of an exported
    checkpoint such as the shipped model: its fp16 weights, no auxiliary heads) into a fresh model
    (a warm start: new optimizer, new LR schedule). Tensors the earlier run lacks, or with another
    shape, keep their initialisation. Returns counts of loaded and kept-fresh tensors."""
    path = run / STATE_DIR / "model.safetensors"
    try:
        if path.is_file():
            weights = load_file(str(path))
        else:  # an exported checkpoint: transformers maps its (possibly legacy) key names
            path = run
            exported = LlavaForConditionalGeneration.from_pretrained(run, dtype=torch.float32)
            weights = {f"model.{n}": p.detach() for n, p in exported.named_parameters()}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a usable training state or checkpoint: {err}") from err
    params = _named_params(model, aux)
    if not any(n.startswith("model.") and n in weights for n in params):
        raise CheckpointError(f"{path} holds no weights of this model")
    loaded = 0
    with torch.no_grad():
        for n, p in params.items():
            if n in weights and weights[n].shape == p.shape:
                p.copy_(weights[n])
                loaded += 1
    return {"loaded": loaded, "fresh": len(params) - loaded}


def export(model: LlavaForConditionalGeneration, processor, out: Path, summary: dict) -> None:
    """Write an ordinary HF checkpoint directory: fp16 weights, config, generation config,
    processor, and `testbed.json` (how it was trained)."""
    half = copy.deepcopy(model).to(torch.float16)
    half.generation_config.update(
        bos_token_id=processor.tokenizer.bos_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=96,
    )
    half.save_pretrained(out)
    # The file stores fp16 (small enough to ship), but the model should *run* in fp32 on CPUs
    # (fp16 CPU matmuls are slow): config "dtype" is what from_pretrained(dtype="auto") uses.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict) and "dtype" in config[sub]:
            config[sub]["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(out)
    (out / "testbed.json").write_text(json.dumps(summary, indent=1))


# ---------------------------------------------------------------- the loop


def build_model(config_name: str, seed: int, with_loc: bool = False, with_query: bool = False):
    """(model, aux heads, processor) of a named config, initialised from `seed`."""
    spec = get_spec(config_name)
    processor = build_processor(spec.image_size, spec.patch_size)
    tok = processor.tokenizer
    config = build_config(
        config_name,
        vocab_size=len(tok),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    aux = Aux(config.vision_config.hidden_size, config.text_config.hidden_size, with_loc, with_query)
    return model, aux, processor


def train(args: TrainArgs) -> dict:
    """Train (or resume) and export. Returns a summary dict."""
    from tqdm import tqdm

    args.validate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, aux, processor = build_model(args.config, args.seed, with_loc=args.loc_aux_weight > 0, with_query=args.query_aux_weight > 0)
    opt = make_optimizer(model, aux, args)
    state_json = out / STATE_DIR / "state.json"
    if state_json.exists():
        previous = json.loads(state_json.read_text())["args"]["config"]
        if previous != args.config:
            raise InputError(f"{out} holds a training state of config {previous!r}, not {args.config!r}; use another --out")
    state = load_state(out, model, aux, opt)
    if state is None and args.init is not None:
        counts = init_from(Path(args.init), model, aux)
        print(f"initialised from {args.init}: {counts['loaded']} tensors loaded, {counts['fresh']} new", flush=True)
    step = state["step"] if state else 0
    elapsed = state["elapsed_s"] if state else 0.0
    builder = BatchBuilder(processor, args.config, None if args.task_weights is None else parse_task_weights(args.task_weights))
    log_path = out / "train_log.jsonl"

    def progress() -> float:
        fr = []
        if args.steps:
            fr.append(step / args.steps)
        if args.minutes:
            fr.append(elapsed / (60 * args.minutes))
        return max(fr)

    def state_dict() -> dict:
        return {"step": step, "elapsed_s": elapsed, "args": {k: v for k, v in asdict(args).items() if k != "stop_after_steps"}}

    bf16 = args.use_bf16()
    model.train()
    aux.train()
    bar = tqdm(total=args.steps, initial=step, disable=not args.progress, unit="step", desc=f"train {args.config}")
    last_save = time.monotonic()
    ema = None
    start_step = step
    while progress() < 1.0:
        if args.stop_after_steps is not None and step - start_step >= args.stop_after_steps:
            break
        t0 = time.monotonic()
        seeds = [train_scene_seed(args.seed, step, args.batch_size, i) for i in range(args.batch_size)]
        batch = builder.build(seeds)
        factor = lr_factor(step, progress(), args)
        for g in opt.param_groups:
            g["lr"] = args.lr * g["lr_mult"] * factor
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            drop = sample_dropout(batch["input_ids"], model.config.image_token_id, model.config.text_config.num_hidden_layers,
                                  args, step, background=batch["patch_targets"][..., 0] == 0)
            loss, parts = compute_loss(model, aux, batch, args.aux_weight, args.proj_aux_weight, drop, args.loc_aux_weight,
                                       args.attn_sup_weight, args.attn_sup_layers, args.query_aux_weight, args.attn_sup_sink,
                                       args.attn_sup_count, args.salience_weight, args.salience_layer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters()), 1.0)
        opt.step()
        step += 1
        dt = time.monotonic() - t0
        elapsed += dt
        ema = parts["loss"] if ema is None else 0.95 * ema + 0.05 * parts["loss"]
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lm=f"{parts['lm']:.3f}", s_step=f"{dt:.2f}", min=f"{elapsed / 60:.1f}")
        if step % args.log_every == 0 or step == 1:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": step, "elapsed_s": round(elapsed, 1), "lr": args.lr * factor, "s_step": round(dt, 3), **parts}) + "\n")
        if time.monotonic() - last_save >= args.save_every_s:
            save_state(out, model, aux, opt, state_dict())
            last_save = time.monotonic()
    bar.close()
    save_state(out, model, aux, opt, state_dict())
    summary = {
        "config": args.config,
        "steps": step,
        "train_minutes": round(elapsed / 60, 2),
        "batch_size": args.batch_size,
        "seed": args.seed,
        "init": args.init,
        "proj_aux_weight": args.proj_aux_weight,
        "loc_aux_weight": args.loc_aux_weight,
        "drop_prob": args.drop_prob,
        "drop_max_rate": args.drop_max_rate,
        "drop_background_first": args.drop_background_first,
        "task_weights": args.task_weights,
        "attn_sup_weight": args.attn_sup_weight,
        "attn_sup_layers": list(args.attn_sup_layers),
        "attn_sup_sink": args.attn_sup_sink,
        "attn_sup_count": args.attn_sup_count,
        "query_aux_weight": args.query_aux_weight,
        "salience_weight": args.salience_weight,
        "salience_layer": args.salience_layer,
        "bf16": bf16,
        "final_loss_ema": ema,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }
    export(model, processor, out, summary)
    return summary


def set_threads(n: int) -> None:
    """Pin intra-op threads (and OMP for child code) before any heavy work."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)
