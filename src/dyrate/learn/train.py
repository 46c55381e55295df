"""The training loop of a rate predictor with a differentiable rate (docs/design.md, "Training";
our objective, see docs/dyrate.md: the paper's own loss is not published).

The VLM is frozen; only the predictor learns. Every training sequence is a prompt plus a response,
teacher-forced: the unpruned model's own greedy answer (generated once with `model.generate`) for the
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

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError
from .config import TrainConfig
from .objective import sequence_loss
from .oracle import label_oracle
from .predictors import RatePredictor, check_predictor, new_predictor, read_safetensors, save_predictor
from .samples import Sample, greedy_responses, reference_responses, samples_digest
from .teacher import Cached, prepare

STATE_KEY = "dyrate_train"


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
                history: list[dict], data: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    meta = {"step": step, "config": asdict(cfg), "history": history, "param_groups": sd["param_groups"], "data": data}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={STATE_KEY: json.dumps(meta)})
    tmp.replace(path)


def _load_state(path: Path, predictor: RatePredictor, opt: torch.optim.Optimizer, cfg: TrainConfig, data: str):
    tensors, meta = read_safetensors(path, "training state file")
    if STATE_KEY not in meta:
        raise CheckpointError(f"{path}: not a dyrate training state")
    try:
        m = json.loads(meta[STATE_KEY])
        step = int(m["step"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: unreadable training state metadata; delete it to start afresh") from None
    if step > cfg.steps:
        raise CheckpointError(f"{path}: the training state is at step {step}, past --steps {cfg.steps}; "
                              "give --steps >= it, or delete the state to start afresh")
    saved = {"objective": "kl", "oracle_kl": 0.02, "rank": "step", "decide": "step",  # older states
             **{k: v for k, v in m["config"].items() if k != "steps"}}
    if saved.get("straight_through") is False:  # an option retired in session 7; off, it changed nothing
        del saved["straight_through"]
    here = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k != "steps"}
    if saved != here:
        diff = ", ".join(f"{k}={saved.get(k)} (now {here[k]})" for k in here if saved.get(k) != here[k])
        raise CheckpointError(f"{path}: a training state for other settings ({diff}); delete it or choose another --out")
    if m.get("data", data) != data:
        raise CheckpointError(f"{path}: a training state for other samples; delete it or choose another --out")
    predictor.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})
    return step, m["history"]


def train(model, processor, samples: Sequence[Sample], cfg: TrainConfig, out: str | Path, max_new_tokens: int = 24,
          save_every: int = 50, progress: bool = True, log: Callable[[str], None] | None = None,
          stop_after: int | None = None, cache: list[Cached] | None = None) -> dict:
    """Train a predictor for `model` on `samples`; write it to `out` (.safetensors). The ce objective
    needs every sample's reference answer; the others ignore answers. `cache`: sequences from
    `build_cache` with the same settings, to train several predictors on one preparation (the
    samples are then not used again).
    Resumes from `out`'s training state file when one exists for the same settings.
    Returns a summary: steps, first and last losses, the file."""

    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"--out {str(out)!r} must end in .safetensors")
    if out.is_dir():
        raise InputError(f"--out {str(out)!r} is a directory; give a .safetensors file path")
    if not samples and cache is None:
        raise InputError("no training samples")
    out.parent.mkdir(parents=True, exist_ok=True)
    n_layers = model.config.get_text_config().num_hidden_layers
    if not 1 <= cfg.k < n_layers:
        raise InputError(f"k={cfg.k} must lie in 1..{n_layers - 1} for this {n_layers}-layer decoder")
    if cfg.objective == "ce" and any(s.answer is None for s in samples):
        raise InputError("the ce objective needs a reference answer for every sample")
    with frozen(model):
        return _train(model, processor, samples, cfg, out, max_new_tokens, save_every, progress, log, stop_after, cache)


def build_cache(model, processor, samples: Sequence[Sample], cfg: TrainConfig, max_new_tokens: int = 24,
                log: Callable[[str], None] | None = None) -> list[Cached]:
    """The teacher-forced sequences of a training run (and, for the oracle objective, every step's
    per-bin KL and oracle bin)."""
    t0 = time.time()
    if cfg.objective == "ce":
        responses = reference_responses(model, processor, [s.answer for s in samples])
    else:
        responses = greedy_responses(model, processor, samples, max_new_tokens)
    cache = [prepare(model, processor, s.image, s.prompt, resp, cfg.k) for s, resp in zip(samples, responses)]
    if log:
        log(f"{len(cache)} teacher-forced sequences, {sum(c.n_steps for c in cache)} response steps "
            f"({time.time() - t0:.1f} s)")
    if cfg.objective == "oracle":
        label_oracle(model, cache, cfg, log)
    return cache


def cache_digest(cache: list[Cached]) -> str:
    """A short hash of prepared sequences (their prompts' groups and responses): what a resumed run
    must train on again."""
    h = hashlib.sha256()
    for c in cache:
        h.update(json.dumps([c.n_prompt, c.groups.tolist(), c.response]).encode())
    return h.hexdigest()[:16]


def _train(model, processor, samples, cfg, out, max_new_tokens, save_every, progress, log, stop_after, cache):
    from tqdm import tqdm

    device = next(model.parameters()).device
    predictor = new_predictor(cfg.arch, cfg.bins, cfg.k, cfg.features, cfg.history, cfg.hidden, model, cfg.seed,
                              rank=cfg.rank, decide=cfg.decide).to(device)
    opt = torch.optim.AdamW(predictor.parameters(), lr=cfg.lr, weight_decay=0.0)
    spath = state_path(out)
    data = samples_digest(samples) if cache is None else cache_digest(cache)
    start, history = 0, []
    if spath.exists():
        start, history = _load_state(spath, predictor, opt, cfg, data)
        check_predictor(model, predictor, k=cfg.k, bins=cfg.bins, name=str(spath))
        if log:
            log(f"resuming from {spath} at step {start}")
    if start < cfg.steps:
        if cache is None:
            cache = build_cache(model, processor, samples, cfg, max_new_tokens, log)
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
            _save_state(spath, predictor, opt, step + 1, cfg, history, data)
    bar.close()
    done = max(start, end)
    _save_state(spath, predictor, opt, done, cfg, history, data)
    save_predictor(predictor.cpu(), out)
    return {"out": str(out), "state": str(spath), "steps": done, "finished": done >= cfg.steps,
            "first": history[0] if history else None, "last": history[-1] if history else None}


