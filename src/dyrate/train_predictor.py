"""Training a rate predictor with a differentiable rate (DESIGN.md section 2; our objective, see
docs/dyrate.md: the paper's own loss is not published).

The VLM is frozen; only the predictor learns. Every training sequence is a prompt plus a response,
teacher-forced: the unpruned model's own greedy answer (generated once with policy `none`) for the
`kl` objective, the reference answer (tokenized, plus EOS) for `ce`. For response step
t (query column P-1+t: the prefill's last prompt token at t=0, then each response token):

  probe at layer K-1 (head-averaged attention of that query) -> share vector (sys, img, ins, res)
  -> predictor logits -> Gumbel-Softmax at temperature tau (annealed) -> bin probabilities p_t
  -> soft rank mask m_t(j) = sum_i p_t,i * M_i[rank_t(j)] over the image tokens (rank by that
     query's probe attention, ties: earlier token first, as the engine ranks)
  -> in layers >= K the attention logit of query t to image key j gets + log(m_t(j) + eps).

Prompt queries use the mask of the last prompt position (the engine's prefill decision applies to
every prompt query); an image token always sees itself (as in the engine). With a one-hot p and
eps = 0 this is exactly the engine's `mask` mode (tested).

Loss = a fit term, mean over the response positions: KL(full || pruned) of the next-token
distributions (objective `kl`) or the pruned model's cross-entropy on the response tokens (`ce`);
plus either `lam * mean_t E[keep_t]` or `budget_weight * (mean_t E[keep_t] - target)^2`,
where E[keep_t] = sum_i p_t,i * keep_i / n_img.

Layers < K, the probe rows and the full model's distributions do not depend on the predictor: they
are computed once per sequence and cached (on CPU); each training step runs layers >= K only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapters import adapter_for
from .api import build_prompt, read_image
from .engine import IMG, RES
from .errors import CheckpointError, InputError
from .predictor import (
    DECIDES,
    RANKS,
    RatePredictor,
    check_predictor,
    feature_vector,
    new_predictor,
    read_safetensors,
    save_predictor,
)
from .soft_mask import expected_keep, mask_bank, ranks, soft_mask

STATE_KEY = "dyrate_train"
OBJECTIVES = ("kl", "ce", "oracle")


@dataclass
class TrainConfig:
    arch: str = "mlp"
    k: int = 2
    bins: int = 10
    history: int = 8
    hidden: int = 32
    features: tuple[str, ...] = ("shares",)
    steps: int = 200
    batch: int = 4  # sequences per optimizer step
    lr: float = 3e-3
    lam: float | None = 0.1  # compute term weight (None: budget mode)
    target_keep: float | None = None  # budget mode: target mean kept fraction
    budget_weight: float = 10.0
    tau_start: float = 1.0
    tau_end: float = 0.1
    straight_through: bool = False  # forward the hard (one-hot) bin, backpropagate the soft one
    eps: float = 1e-6
    seed: int = 0
    objective: str = "kl"  # fit term: "kl" to the full model on its own answers, "ce" on reference answers,
    # or "oracle": cross-entropy to each step's oracle bin (the most pruning whose KL stays <= oracle_kl)
    oracle_kl: float = 0.02
    rank: str = "step"  # image-token ranking: each step's probe ("step") or the prefill's ("prefill")
    decide: str = "step"  # a rate per step, or one per prompt at prefill ("prefill": oracle objective only)

    def __post_init__(self):
        self.features = tuple(self.features)
        if self.rank not in RANKS:
            raise InputError(f"rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if self.decide not in DECIDES:
            raise InputError(f"decide must be one of {', '.join(DECIDES)}, got {self.decide!r}")
        if self.decide == "prefill" and (self.objective != "oracle" or self.rank != "prefill"):
            raise InputError("decide=prefill (one rate per prompt) needs the oracle objective and rank=prefill "
                             "(the prefill's kept set serves every step)")
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if (self.lam is None) == (self.target_keep is None):
            raise InputError("give exactly one of lambda (compute penalty) and target_keep (budget)")
        if self.target_keep is not None and not 0.0 < self.target_keep <= 1.0:
            raise InputError(f"target keep fraction must lie in (0, 1], got {self.target_keep}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise InputError(f"steps, batch and lr must be positive (got {self.steps}, {self.batch}, {self.lr})")
        if not 0 < self.tau_end <= self.tau_start:
            raise InputError(f"need 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}")

    def tau(self, step: int) -> float:
        """Exponential annealing from tau_start (step 0) to tau_end (last step)."""
        frac = step / max(1, self.steps - 1)
        return self.tau_start * (self.tau_end / self.tau_start) ** frac


# ---------------------------------------------------------------- teacher-forced sequences


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
    batch = processor(images=[read_image(image)], text=[build_prompt(processor, prompt)], return_tensors="pt")
    prompt_ids = batch["input_ids"].to(device)  # (1, P)
    n_prompt, n_steps = prompt_ids.shape[1], len(response)
    if n_steps < 1:
        raise InputError("empty response")
    ids = torch.cat([prompt_ids, torch.tensor([response[:-1]], device=device, dtype=torch.long)], dim=1)  # (1, L)
    length = ids.shape[1]
    groups = adapter.token_groups(prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool))[0]
    groups = torch.cat([groups, groups.new_full((n_steps - 1,), RES)])  # (L,)
    hidden = adapter.embed(ids, batch["pixel_values"].to(device))  # (1, L, d)
    position_ids = torch.arange(length, device=device)[None]  # (1, L)
    pos_emb = adapter.rotary(hidden, position_ids)
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
    return Cached(hidden_k.cpu(), probe.cpu(), img_cols.cpu(), groups.cpu(), n_prompt, teacher.cpu(), list(response))


def shares_of(c: Cached) -> torch.Tensor:
    """(T, 4) share vector (sys, img, ins, res) of every response step."""
    onehot = F.one_hot(c.groups, 5)[:, :4].float()  # (L, 4)
    return c.probe @ onehot


def step_hidden(c: Cached) -> torch.Tensor:
    """(T, d) hidden state after layer K-1 of every response step's query (the `hidden` feature)."""
    return c.hidden[0, c.n_prompt - 1 : c.n_prompt - 1 + c.n_steps]


def pruned_logprobs(model, c: Cached, p: torch.Tensor, bank: torch.Tensor, k: int, eps: float,
                    hard: torch.Tensor | None = None, rank_by: str = "step") -> torch.Tensor:
    """Layers >= K under the soft mask of bin probabilities p (T, B): log-probabilities (T, V).
    hard: one-hot bins (T, B) for a straight-through pass: the logits get the hard mask's bias in
    the forward pass and the soft mask's gradient in the backward pass. rank_by: "step" (each
    query's probe ranks the image tokens) or "prefill" (the last prompt token's, for every query)."""
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
    if hard is not None:
        hard_bias = torch.log(soft_mask(hard.to(device), rank, bank.to(device)) + eps)
        bias = hard_bias - bias.detach() + bias  # value: hard mask; gradient: soft mask
    add = torch.zeros(length, length, device=device, dtype=m.dtype)
    add[:, img] = bias[step_of]  # (L, N_img): prompt queries use the step-0 mask
    add[img, img] = 0.0  # an image token always sees itself (engine: the query's own slot)
    mask = (_causal(length, device) + add).to(hidden.dtype)[None, None]  # (1, 1, L, L)
    position_ids = torch.arange(length, device=device)[None]
    pos_emb = adapter.rotary(hidden, position_ids)
    for i in range(k, adapter.n_layers):
        hidden = adapter.layers[i](hidden, attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids)
    return adapter.logits(hidden)[0, n_prompt - 1:].log_softmax(-1)  # (T, V)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """softmax((logits + g) / tau), g ~ Gumbel(0, 1) from `generator` (None: no noise)."""
    if generator is None:
        return (logits / tau).softmax(-1)
    u = torch.rand(logits.shape, generator=generator).clamp(1e-10, 1 - 1e-10).to(logits.device)
    return ((logits - torch.log(-torch.log(u))) / tau).softmax(-1)


def _penalty(cfg: TrainConfig, keep: torch.Tensor) -> torch.Tensor:
    """The compute term: lambda * mean expected kept fraction, or the squared budget penalty."""
    return cfg.lam * keep if cfg.lam is not None else cfg.budget_weight * (keep - cfg.target_keep) ** 2


def sequence_loss(model, predictor: RatePredictor, c: Cached, cfg: TrainConfig, tau: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one sequence (differentiable w.r.t. the predictor) and its parts: fit is the term optimised
    (KL or CE, after cfg.objective), kl the KL to the full model in either case."""
    device = next(predictor.parameters()).device
    n_img = len(c.img_cols)
    bank = mask_bank(cfg.bins, n_img, device)
    x = feature_vector(shares_of(c).to(device), torch.arange(c.n_steps, device=device), predictor.config.features,
                       step_hidden(c).to(device))  # (T, F)
    logits = predictor.forward_sequence(x[None])[0]  # (T, B)
    if cfg.objective == "oracle":  # supervised: no pruned pass needed
        logits = logits[: len(c.oracle)]  # decide=prefill: one label, the prefill step's
        fit = F.cross_entropy(logits, c.oracle.to(device))
        keep = expected_keep(logits.softmax(-1), bank).mean()
        loss = fit + _penalty(cfg, keep)
        parts = {"loss": loss, "fit": fit, "kl": torch.tensor(float("nan")), "keep": keep}
        return loss, {key: float(v.detach()) for key, v in parts.items()}
    p = gumbel_softmax(logits, tau, generator)  # (T, B)
    # straight-through: the pass sees the hard mask inference uses, gradients come from the soft one
    hard = F.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype) if cfg.straight_through else None  # (T, B)
    logp = pruned_logprobs(model, c, p, bank, cfg.k, cfg.eps, hard, cfg.rank)  # (T, V)
    teacher = c.teacher.to(logp.device)
    kl = (teacher.exp() * (teacher - logp)).sum(-1).mean()
    if cfg.objective == "ce":
        target = torch.tensor(c.response, device=logp.device)  # (T,)
        fit = -logp.gather(1, target[:, None]).mean()  # (T, 1) log-probabilities of the targets -> mean
    else:
        fit = kl
    keep = expected_keep(p, bank).mean().to(kl.device)
    loss = fit + _penalty(cfg, keep)
    parts = {"loss": loss, "fit": fit, "kl": kl, "keep": keep}
    return loss, {key: float(v.detach()) for key, v in parts.items()}


@torch.no_grad()
def bin_kls(model, c: Cached, bins: int, k: int, eps: float, rank_by: str = "step") -> torch.Tensor:
    """(T, bins) KL of every response step's next-token distribution to the full model's when every
    step is pruned at bin i (hard masks, one pass per bin; column 0, the full model, is 0)."""
    n_img = len(c.img_cols)
    bank = mask_bank(bins, n_img, c.teacher.device)
    teacher = c.teacher
    out = torch.zeros(c.n_steps, bins)
    for i in range(1, bins):
        p = F.one_hot(torch.full((c.n_steps,), i), bins).float()  # (T, B)
        logp = pruned_logprobs(model, c, p, bank, k, eps, rank_by=rank_by).cpu()  # (T, V)
        out[:, i] = (teacher.exp() * (teacher - logp)).sum(-1)
    return out


def oracle_from_kls(kls: torch.Tensor, max_kl: float) -> torch.Tensor:
    """(T,) long: for every step the largest bin i such that bins 1..i all keep its KL <= max_kl
    (0 if even bin 1 does not): how much each step could drop. kls: (T, bins) from `bin_kls`."""
    ok = kls <= max_kl  # (T, bins)
    ok[:, 0] = True  # bin 0 is the full model itself
    return ok.long().cumprod(dim=1).sum(1) - 1  # cumprod: 1 while every bin so far is within


def prompt_oracle_from_kls(kls: torch.Tensor, max_kl: float) -> torch.Tensor:
    """(1,) long: the largest bin i such that bins 1..i keep *every* step's KL <= max_kl when the
    whole answer is pruned at that bin (kls from `bin_kls` with rank "prefill": FastV at r = i/B,
    teacher-forced): how much this prompt could drop with one rate decided at prefill."""
    return oracle_from_kls(kls.max(dim=0, keepdim=True).values, max_kl)  # (1, bins) worst step per bin


def oracle_bins(model, c: Cached, bins: int, k: int, eps: float, max_kl: float) -> torch.Tensor:
    """(T,) long oracle bins of one sequence (the target of the "oracle" objective)."""
    return oracle_from_kls(bin_kls(model, c, bins, k, eps), max_kl)


# ---------------------------------------------------------------- data


def greedy_responses(model, processor, images, prompts, max_new_tokens: int, batch: int = 8) -> list[list[int]]:
    """The unpruned model's greedy answers (policy none), token ids including EOS when reached."""
    from .api import generate

    out: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        res = generate(model, processor, images[i:i + batch], prompts[i:i + batch], policy="none",
                       max_new_tokens=max_new_tokens)
        out += [r.token_ids for r in res]
    return out


def reference_responses(model, processor, answers: list[str]) -> list[list[int]]:
    """Reference answers as response token ids: tokenized without special tokens, plus EOS."""
    tok = getattr(processor, "tokenizer", processor)
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.generation_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise InputError("neither the tokenizer nor the model's generation config names an EOS token")
    return [tok(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]


def testbed_samples(model, n: int, seed: int = 0) -> tuple[list, list[str], list[str]]:
    """n procedurally generated (image, question, answer) triples at the model's image size (testbed scenes)."""
    from .testbed.data import sample_example, train_scene_seed
    from .testbed.scenes import render

    size = model.config.vision_config.image_size
    images, prompts, answers = [], [], []
    for i in range(n):
        ex = sample_example(train_scene_seed(100 + seed, 0, 1, i))  # a seed range the VLM's training does not use
        images.append(render(ex.scene, size))
        prompts.append(ex.question)
        answers.append(ex.answer)
    return images, prompts, answers


def folder_samples(folder: str | Path, n: int) -> tuple[list, list[str], list[str]]:
    """Up to n (image path, question, answer) triples from a `dyrate testbed data`-style folder: vqa.jsonl,
    pope_*.jsonl and captions.json, whichever exist (questions first). The answer is the first VQA
    answer, the POPE label or the first reference caption."""
    from .evaluation.datasets import DEFAULT_CAPTION_PROMPT, load_dataset

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--data {str(folder)!r} is not a directory")
    files = [("vqa", folder / "vqa.jsonl"), *[("pope", f) for f in sorted(folder.glob("pope_*.jsonl"))],
             ("caption", folder / "captions.json")]
    images, prompts, answers = [], [], []
    for task, path in files:
        if not path.is_file() or len(prompts) >= n:
            continue
        for row in load_dataset(task, path, None, n - len(prompts)).rows:
            images.append(row.image)
            prompts.append(row.question or DEFAULT_CAPTION_PROMPT)
            answers.append(row.label if task == "pope" else row.references[0])
    if not prompts:
        raise InputError(f"--data {str(folder)!r}: no vqa.jsonl, pope_*.jsonl or captions.json rows")
    return images, prompts, answers


# ---------------------------------------------------------------- the loop


@contextmanager
def frozen(model):
    """The VLM's parameters without gradients for the duration (flags restored afterwards)."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def state_path(out: Path) -> Path:
    return out.with_name(out.stem + ".train-state.safetensors")


def _save_state(path: Path, predictor: RatePredictor, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                history: list[dict]) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    meta = {"step": step, "config": asdict(cfg), "history": history, "param_groups": sd["param_groups"]}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={STATE_KEY: json.dumps(meta)})
    tmp.replace(path)


def _load_state(path: Path, predictor: RatePredictor, opt: torch.optim.Optimizer, cfg: TrainConfig):
    tensors, meta = read_safetensors(path, "training state file")
    if STATE_KEY not in meta:
        raise CheckpointError(f"{path}: not a dyrate training state")
    m = json.loads(meta[STATE_KEY])
    saved = {"objective": "kl", "straight_through": False, "oracle_kl": 0.02, "rank": "step", "decide": "step",
             **{k: v for k, v in m["config"].items() if k != "steps"}}  # older states
    here = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k != "steps"}
    if saved != here:
        diff = ", ".join(f"{k}={saved.get(k)} (now {here[k]})" for k in here if saved.get(k) != here[k])
        raise CheckpointError(f"{path}: a training state for other settings ({diff}); delete it or choose another --out")
    predictor.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})
    return m["step"], m["history"]


def train(model, processor, images, prompts, cfg: TrainConfig, out: str | Path, max_new_tokens: int = 24,
          save_every: int = 50, progress: bool = True, log: Callable[[str], None] | None = None,
          stop_after: int | None = None, answers: list[str] | None = None, cache: list[Cached] | None = None) -> dict:
    """Train a predictor for `model` on (image, prompt) pairs; write it to `out` (.safetensors).
    The ce objective needs the reference `answers` (one per prompt); kl ignores them. `cache`:
    sequences from `build_cache` with the same settings, to train several predictors on one
    preparation (images and prompts are then not used again).
    Resumes from `out`'s training state file when one exists for the same settings.
    Returns a summary: steps, first and last losses, the file."""

    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"--out {str(out)!r} must end in .safetensors")
    if len(images) != len(prompts) or not prompts:
        raise InputError(f"need one image per prompt, got {len(images)} images and {len(prompts)} prompts")
    out.parent.mkdir(parents=True, exist_ok=True)
    n_layers = model.config.get_text_config().num_hidden_layers
    if not 1 <= cfg.k < n_layers:
        raise InputError(f"k={cfg.k} must lie in 1..{n_layers - 1} for this {n_layers}-layer decoder")
    if cfg.objective == "ce":
        if answers is None:
            raise InputError("the ce objective needs reference answers")
        if len(answers) != len(prompts):
            raise InputError(f"{len(answers)} reference answers for {len(prompts)} prompts")
    with frozen(model):
        return _train(model, processor, images, prompts, answers, cfg, out, max_new_tokens, save_every, progress, log,
                      stop_after, cache)


def build_cache(model, processor, images, prompts, cfg: TrainConfig, max_new_tokens: int = 24,
                answers: list[str] | None = None, log: Callable[[str], None] | None = None) -> list[Cached]:
    """The teacher-forced sequences of a training run (and, for the oracle objective, every step's
    per-bin KL and oracle bin)."""
    t0 = time.time()
    if cfg.objective == "ce":
        responses = reference_responses(model, processor, answers)
    else:
        responses = greedy_responses(model, processor, images, prompts, max_new_tokens)
    cache = [prepare(model, processor, im, pr, resp, cfg.k) for im, pr, resp in zip(images, prompts, responses)]
    if log:
        log(f"{len(cache)} teacher-forced sequences, {sum(c.n_steps for c in cache)} response steps "
            f"({time.time() - t0:.1f} s)")
    if cfg.objective == "oracle":
        label_oracle(model, cache, cfg, log)
    return cache


def label_oracle(model, cache: list[Cached], cfg: TrainConfig, log: Callable[[str], None] | None = None) -> None:
    """Set every sequence's oracle bins at cfg.oracle_kl (the per-bin KLs are computed once and kept)."""
    t0 = time.time()
    label = prompt_oracle_from_kls if cfg.decide == "prefill" else oracle_from_kls
    for c in cache:
        if c.bin_kl is None or c.bin_kl.shape[1] != cfg.bins or c.bin_kl_rank != cfg.rank:
            c.bin_kl, c.bin_kl_rank = bin_kls(model, c, cfg.bins, cfg.k, cfg.eps, cfg.rank), cfg.rank
        c.oracle = label(c.bin_kl, cfg.oracle_kl)  # (T,), or (1,) for one rate per prompt
    if log:
        bins = torch.cat([c.oracle for c in cache])
        keep = mask_bank(cfg.bins, len(cache[0].img_cols)).float().mean(1)[bins].mean()
        what = "per prompt, every step" if cfg.decide == "prefill" else "per step"
        log(f"oracle bins ({what} KL <= {cfg.oracle_kl}): mean bin {bins.float().mean():.2f}, kept fraction {keep:.3f}, "
            f"histogram {torch.bincount(bins, minlength=cfg.bins).tolist()} ({time.time() - t0:.1f} s)")


def _train(model, processor, images, prompts, answers, cfg, out, max_new_tokens, save_every, progress, log, stop_after,
           cache):
    from tqdm import tqdm

    device = next(model.parameters()).device
    predictor = new_predictor(cfg.arch, cfg.bins, cfg.k, cfg.features, cfg.history, cfg.hidden, model, cfg.seed,
                              rank=cfg.rank, decide=cfg.decide).to(device)
    opt = torch.optim.AdamW(predictor.parameters(), lr=cfg.lr, weight_decay=0.0)
    spath = state_path(out)
    start, history = 0, []
    if spath.exists():
        start, history = _load_state(spath, predictor, opt, cfg)
        check_predictor(model, predictor, k=cfg.k, bins=cfg.bins, name=str(spath))
        if log:
            log(f"resuming from {spath} at step {start}")
    if start < cfg.steps:
        if cache is None:
            cache = build_cache(model, processor, images, prompts, cfg, max_new_tokens, answers, log)
        elif cfg.objective == "oracle":
            label_oracle(model, cache, cfg, log)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="train-predictor", unit="step")
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for step in range(start, end):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the same noise on resume
        order = torch.randperm(len(cache), generator=gen)[: cfg.batch].tolist()
        tau = cfg.tau(step)
        opt.zero_grad(set_to_none=True)
        parts = {"loss": 0.0, "fit": 0.0, "kl": 0.0, "keep": 0.0}
        for i in order:
            loss, info = sequence_loss(model, predictor, cache[i], cfg, tau, gen)
            (loss / len(order)).backward()
            for key in parts:
                parts[key] += info[key] / len(order)
        opt.step()
        history.append({"step": step + 1, "tau": round(tau, 4), **{k: round(v, 6) for k, v in parts.items()}})
        bar.update(1)
        # the fit under its objective's name, then the KL (one entry when the objective is kl)
        shown = {"loss": parts["loss"], cfg.objective: parts["fit"], "kl": parts["kl"]}
        bar.set_postfix(**{k: f"{v:.4f}" for k, v in shown.items()}, keep=f"{parts['keep']:.3f}", tau=f"{tau:.2f}")
        if (step + 1) % save_every == 0 and step + 1 < end:
            _save_state(spath, predictor, opt, step + 1, cfg, history)
    bar.close()
    done = max(start, end)
    _save_state(spath, predictor, opt, done, cfg, history)
    save_predictor(predictor.cpu(), out)
    return {"out": str(out), "state": str(spath), "steps": done, "finished": done >= cfg.steps,
            "first": history[0] if history else None, "last": history[-1] if history else None}


@torch.no_grad()
def evaluate(model, predictor: RatePredictor, cache: list[Cached], cfg: TrainConfig, tau: float | None = None) -> dict:
    """Noise-free loss (softmax at `tau`, default tau_end) averaged over cached sequences."""
    tau = cfg.tau_end if tau is None else tau
    parts = {"loss": 0.0, "fit": 0.0, "kl": 0.0, "keep": 0.0}
    for c in cache:
        _, info = sequence_loss(model, predictor, c, cfg, tau, None)
        for key in parts:
            parts[key] += info[key] / len(cache)
    return parts


__all__ = ["OBJECTIVES", "Cached", "TrainConfig", "bin_kls", "build_cache", "evaluate", "folder_samples", "gumbel_softmax",
           "label_oracle", "oracle_from_kls", "prepare", "prompt_oracle_from_kls", "pruned_logprobs", "reference_responses", "sequence_loss",
           "shares_of", "step_hidden", "testbed_samples", "train"]
