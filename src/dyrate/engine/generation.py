"""Token-level decoding on top of the engine: greedy, seeded sampling and beam search.

Sampling uses transformers' own logits warpers in `model.generate`'s order (temperature, top-k,
top-p) and draws with `torch.multinomial`, so with the same seed it consumes the random stream as
`model.generate` does. Beam search follows `model.generate`'s (vectorised) algorithm: keep the best
2 * num_beams continuations, finished hypotheses scored by sum of log-probs / length**length_penalty,
the same early-stop heuristic. With pruning off both are token-for-token equal to `model.generate`
(tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..errors import InputError
from .columns import as_vision
from .loop import Engine


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    seed: int | None = None

    def __post_init__(self):
        for name in ("max_new_tokens", "num_beams", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"{name} must be an integer, got {value!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise InputError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("temperature", "top_p", "length_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.num_beams < 1:
            raise InputError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise InputError("beam search with sampling is not supported: use num_beams > 1 or do_sample, not both")
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")

    def warpers(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                procs.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        return procs


@dataclass
class RowOutput:
    token_ids: list[int]  # new tokens, up to and including EOS
    steps: list[int]  # for each new token, the engine row that produced it (records index by step)


def generate_tokens(engine: Engine, input_ids, attention_mask, vision, opts: GenerationOptions, eos: list[int], pad: int,
                    images_per_row: list[int] | None = None):
    """Generate for a batch. Returns (outputs per input row, final DecodeState). images_per_row:
    (B,) image count of each row when some row has several (beam search repeats rows)."""
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    if opts.num_beams > 1:
        return _beam_search(engine, input_ids, attention_mask, vision, opts, eos, pad, images_per_row)
    return _sample(engine, input_ids, attention_mask, vision, opts, eos, pad)


def _sample(engine, input_ids, attention_mask, vision, opts, eos, pad):
    b = input_ids.shape[0]
    eos_t = torch.tensor(eos, device=input_ids.device)
    warpers = opts.warpers()
    logits, state = engine.prefill(input_ids, attention_mask, vision)
    unfinished = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    chosen = []
    for t in range(opts.max_new_tokens):
        scores = warpers(input_ids, logits)
        if opts.do_sample:
            nxt = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        nxt = torch.where(unfinished, nxt, pad)
        chosen.append(nxt)
        unfinished &= ~torch.isin(nxt, eos_t)
        if t + 1 == opts.max_new_tokens or not bool(unfinished.any()):
            break
        logits = engine.decode(state, nxt)
    tokens = torch.stack(chosen, dim=1).tolist()  # (B, T)
    outputs = []
    for row in range(b):
        ids = tokens[row]
        end = next((i + 1 for i, tok in enumerate(ids) if tok in eos), len(ids))
        outputs.append(RowOutput(ids[:end], [row] * end))
    return outputs, state


def _beam_search(engine, input_ids, attention_mask, vision, opts, eos, pad, images_per_row=None):
    nb, lp = opts.num_beams, opts.length_penalty
    b, prompt_len = input_ids.shape
    device = input_ids.device
    # (B, P) -> (B * nb, P): every beam starts from its prompt
    input_ids = input_ids.repeat_interleave(nb, dim=0)
    attention_mask = attention_mask.repeat_interleave(nb, dim=0)
    vision = engine.adapter.repeat_rows(as_vision(vision), nb, images_per_row)
    eos_t = torch.tensor(eos, device=device)
    keep = max(2, 1 + len(eos)) * nb  # continuations considered per batch item
    top_nb = torch.arange(keep, device=device) < nb
    t_max = opts.max_new_tokens
    neg = -1.0e9

    run_tokens = torch.full((b, nb, t_max), pad, dtype=torch.long, device=device)
    run_rows = torch.full((b, nb, t_max), -1, dtype=torch.long, device=device)  # engine row per step
    run_scores = torch.zeros(b, nb, device=device)
    run_scores[:, 1:] = neg  # only the first beam's continuations count at step 0
    fin_tokens, fin_rows = run_tokens.clone(), run_rows.clone()
    fin_scores = torch.full((b, nb), neg, device=device)
    fin_done = torch.zeros(b, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
    offset = torch.arange(b, device=device)[:, None] * nb  # (B, 1)

    logits, state = engine.prefill(input_ids, attention_mask, vision)
    for t in range(t_max):
        logprobs = logits.log_softmax(dim=-1)  # (B * nb, V)
        vocab = logprobs.shape[-1]
        total = (logprobs.view(b, nb, vocab) + run_scores[:, :, None]).view(b, nb * vocab)
        top_scores, top_idx = total.topk(keep, dim=1)  # (B, keep)
        src_beam, tok = top_idx // vocab, top_idx % vocab
        cand_tokens = run_tokens.gather(1, src_beam[:, :, None].expand(-1, -1, t_max)).clone()  # (B, keep, T)
        cand_rows = run_rows.gather(1, src_beam[:, :, None].expand(-1, -1, t_max)).clone()
        cand_tokens[:, :, t] = tok
        cand_rows[:, :, t] = src_beam + offset
        hits = torch.isin(tok, eos_t) | (t + 1 >= t_max)  # (B, keep)

        # running beams for the next step: the best continuations that did not stop
        alive_scores = top_scores + hits.float() * neg
        nxt = alive_scores.topk(nb, dim=1).indices  # (B, nb)
        run_tokens = cand_tokens.gather(1, nxt[:, :, None].expand(-1, -1, t_max))
        run_rows = cand_rows.gather(1, nxt[:, :, None].expand(-1, -1, t_max))
        run_scores = alive_scores.gather(1, nxt)

        # finished hypotheses: merge the new ones (among the top nb) with the kept ones
        fin_new = hits & top_nb[None, :]
        norm = top_scores / ((t + 1) ** lp)
        norm = norm + (fin_done.all(dim=1, keepdim=True) & opts.early_stopping).float() * neg
        norm = norm + (~improvable).float() * neg + (~fin_new).float() * neg
        merged = torch.cat([fin_scores, norm], dim=1)
        best = merged.topk(nb, dim=1).indices  # (B, nb)
        fin_tokens = torch.cat([fin_tokens, cand_tokens], 1).gather(1, best[:, :, None].expand(-1, -1, t_max))
        fin_rows = torch.cat([fin_rows, cand_rows], 1).gather(1, best[:, :, None].expand(-1, -1, t_max))
        fin_scores = merged.gather(1, best)
        fin_done = torch.cat([fin_done, fin_new], 1).gather(1, best)

        # can a running beam still beat the worst finished one? (model.generate's heuristic)
        best_possible = run_scores[:, :1] / ((t + 1) ** lp)
        worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, torch.full_like(fin_scores, neg))
        improvable = improvable & (best_possible > worst).any(dim=-1, keepdim=True)
        open_beam = not (bool(fin_done.all()) and opts.early_stopping)
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break
        parent = run_rows[:, :, t].reshape(-1)  # (B * nb,) engine row each running beam continues
        state.reorder(parent)
        logits = engine.decode(state, run_tokens[:, :, t].reshape(-1))

    outputs = []
    tokens, rows = fin_tokens[:, 0].tolist(), fin_rows[:, 0].tolist()
    for i in range(b):
        n = sum(1 for r in rows[i] if r >= 0)
        outputs.append(RowOutput(tokens[i][:n], rows[i][:n]))
    return outputs, state


def forced_logprobs(engine: Engine, input_ids, attention_mask, vision, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher forcing under the engine's policy, one row: the prefill prunes as in generation, then
    each of `tokens` (T,) is fed as a decode step. Returns the next-token log-probabilities (T, V)
    at every position of `tokens` (row t predicts tokens[t])."""
    logits, state = engine.prefill(input_ids, attention_mask, vision)
    out = [logits.log_softmax(-1)]
    for tok in tokens[:-1]:
        logits = engine.decode(state, tok.view(1))
        out.append(logits.log_softmax(-1))
    return torch.cat(out, dim=0)  # (T, V)
