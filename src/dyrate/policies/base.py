"""The policy interface.

A policy decides, for every pruning *stage* and every step, how many image tokens each row keeps.
The engine owns everything else (probing, ranking, evicting, masking). A stage starts at decoder
layer K (FastV's convention): layers < K are never pruned by it, the probe reads layer K-1, and
layers >= K (until the next stage) see only the kept image tokens. Stages are nested: a later
stage keeps a subset of an earlier one.

A policy never stores per-call state on itself: whatever it remembers across steps lives in the
`state` dict the engine creates with `init_state` and hands back each step (tensors with the batch
as first dimension, so the engine can reorder them for beam search).
"""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from dataclasses import dataclass

import torch

from ..errors import PolicySpecError


def check_layer(k: int, name: str = "k") -> int:
    if k < 1:
        raise PolicySpecError(f"{name}={k}: the first pruned layer must be >= 1 (layer K-1 is the probe)")
    return k


POSITION_RULES = ("renumber", "keep")


def check_positions(policy) -> None:
    """A pre-LLM policy's `positions` field: None (the family's rule), renumber or keep."""
    if policy.positions is not None and policy.positions not in POSITION_RULES:
        raise PolicySpecError(f"{policy.spec()}: positions must be one of {', '.join(POSITION_RULES)}")


def check_rate(r: float, name: str = "r") -> float:
    if not 0.0 <= r < 1.0:
        raise PolicySpecError(f"{name}={r}: a reduction rate must lie in [0, 1)")
    return r


@dataclass
class Probe:
    """What a policy sees at one stage and one step (batch of B rows).

    shares: (B, 4) float, attention of the newest query at the probe layer summed per group
            (sys, img, ins, res), head-averaged; each row sums to 1. None at the decode steps of a
            policy that decides without a probe (`decode_decides`).
    img_scores: (B, S) float, that attention on each image slot (0 where the slot is not a
            candidate image token); the engine ranks image tokens by it. Filled only for `scores`,
            i.e. after `keep` asked some row to give tokens up (None inside `keep`: the cheap
            part of a step comes first).
    n_img: (B,) long, image tokens of each row before any pruning.
    kept: (B,) long, image tokens this stage keeps before this step's decision.
    step: 0 at prefill, t at the t-th decode step.
    hidden: (B, d) the newest query's hidden state after the probe layer K-1 (the input of layer K).
    slot_*: at prefill, for a policy that sets `needs_slots`, the states, keys and groups of every
            slot the probe layer holds (slot j of a row is its j-th column, left padding first).
    rated: at prefill, for a policy with `text_raters`, the probe layer's attention of the rating
            text queries (the policy's `raters` weights) over its slots (B, S), head-averaged.
    """

    shares: torch.Tensor
    img_scores: torch.Tensor | None
    n_img: torch.Tensor
    kept: torch.Tensor
    step: int
    hidden: torch.Tensor | None = None
    # At prefill, for policies with `needs_slots` (e.g. DART): every slot of the probe's segment
    slot_states: torch.Tensor | None = None  # (B, S, d) hidden states after layer K-1, final norm applied
    slot_keys: torch.Tensor | None = None  # (B, S, Hkv * D) layer K-1's keys (after RoPE, as cached)
    slot_groups: torch.Tensor | None = None  # (B, S) long group of each slot (PAD for padding)
    slot_hidden: torch.Tensor | None = None  # (B, S, d) hidden states after layer K-1 (no norm)
    candidates: torch.Tensor | None = None  # (B, S) bool: the image slots this stage may keep
    rated: torch.Tensor | None = None  # (B, S) float32, the raters' attention (policies with `text_raters`)


@dataclass
class Reduction:
    """What a pre-LLM policy makes of one image: `features` (m, d) replace the image's n tokens in
    the decoder's input, in this order; `anchors` (m,) long says which original token (0..n-1) each
    stands for, so a family that keeps original positions (M-RoPE) gives it that token's position;
    a merged token's anchor is the token it was merged into (docs/methods.md)."""

    features: torch.Tensor
    anchors: torch.Tensor


def check_rate_pairs(name: str, pairs, key: str, along: str) -> None:
    """A schedule's (key, rate) pairs: keys distinct and ascending, rates in [0, 1) and never
    decreasing (kept sets only shrink). `key` names the keys (layer, step), `along` the direction."""
    keys = [k for k, _ in pairs]
    rates = [check_rate(r, f"rate of {key} {k}") for k, r in pairs]
    if keys != sorted(set(keys)):
        raise PolicySpecError(f"{name}: {key}s {keys} must be distinct and ascending")
    if rates != sorted(rates):
        raise PolicySpecError(f"{name}: rates {rates} must not decrease {along}")


def check_stages(name: str, steps) -> None:
    """A policy's LAYER=RATE stages (schedule, sparsevlm): at least one, layers >= 1 and ascending,
    rates in [0, 1) and never decreasing with depth."""
    if not steps:
        raise PolicySpecError(f"{name}: give at least one LAYER=RATE stage")
    for k, _ in steps:
        check_layer(k, "layer")
    check_rate_pairs(name, steps, "layer", "with depth")


def prefill_ranking(probe: Probe, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, S) scores for a policy that ranks by the prefill's probe at every step (FastV's ranking,
    kept): stored at step 0, handed back later. The slots the prefill probe saw keep their indices
    (the probe layer's segment is never compacted); later slots are never image tokens (score 0)."""
    if probe.step == 0:
        state["prefill_scores"] = probe.img_scores  # (B, S_prefill)
    first = state["prefill_scores"]
    pad = probe.img_scores.shape[1] - first.shape[1]
    return torch.cat([first, first.new_zeros(first.shape[0], pad)], dim=1) if pad else first  # (B, S)


class Policy(abc.ABC):
    """Base class. Subclasses are frozen dataclasses holding only configuration."""

    #: name used in spec strings and the registry
    name: str = "?"
    #: True when decisions at decode steps need a fresh probe (False: decided once at prefill)
    decode_probe: bool = False
    #: True when the policy decides at decode steps without a probe row (Probe.shares is None there;
    #: it ranks by the prefill's probe, e.g. a schedule over decode steps): no attention is probed
    decode_decides: bool = False
    #: True for a pre-LLM policy (`PreLLMPolicy`): `reduce` acts on each image before the decoder
    pre_llm: bool = False
    #: True when the prefill decision needs every slot's state and key (Probe.slot_*, candidates)
    needs_slots: bool = False
    #: True when the prefill probe also weighs chosen text queries (`raters`; Probe.rated)
    text_raters: bool = False
    #: True when a prefill decision also replaces some kept slots' states (`merged_states`)
    merges: bool = False
    #: True when every step's kept set is the top of the prefill's ranking (decided once at prefill, or
    #: ranked by `prefill_ranking`): the kept sets are nested, so mask mode reads a prefix (docs/design.md, "Modes")
    prefill_ranked: bool = False

    @property
    def stages(self) -> tuple[int, ...]:
        """First pruned layer of each stage, ascending (empty: no pruning, no probe)."""
        return ()

    def validate(self, n_layers: int) -> None:
        """Raise PolicySpecError if the policy cannot run on a decoder with `n_layers` layers."""
        for k in self.stages:
            if k >= n_layers:
                raise PolicySpecError(
                    f"{self.spec()}: layer k={k} must be < the decoder's {n_layers} layers"
                )

    def check_model(self, model) -> None:
        """Raise PolicySpecError / CheckpointError if the policy was built for another model (e.g. a
        learned predictor trained on another checkpoint). Called once by the engine. Default: no check."""

    def init_state(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    @abc.abstractmethod
    def keep(self, stage: int, probe: Probe, state: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Target image-token count per row (B,) long for `stage`, or None to leave the kept set as it is."""

    def decides_at(self, step: int) -> bool:
        """May the policy change its kept set at decode step `step` (>= 1)? False lets the engine skip
        that step's probe and decision (`keep` would return None there). Default: every step."""
        return True

    def scores(self, stage: int, probe: Probe, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, S) ranking scores of the image slots: the engine keeps the highest `keep` of each row.
        Default: the probe's attention (FastV's criterion). Only candidate slots are ranked."""
        return probe.img_scores

    def rate(self, stage: int, probe: Probe, keep: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reduction rate behind this step's decision (B,), for the trace. Default: 1 - keep / n_img.
        A policy that chose a rate itself can leave it in `state` during `keep` and return it here."""
        return 1.0 - keep / probe.n_img.clamp(min=1)  # true division: float

    def raters(self, embeds: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """For `text_raters`: (B, P) float weights of the prompt's columns as rating queries, from the
        decoder's input embeddings (B, P, d) and groups (B, P). Called once per prefill."""
        raise NotImplementedError(f"{self.name} sets text_raters but defines no raters()")

    def merged_states(self, stage: int, probe: Probe, state: dict[str, torch.Tensor]):
        """For `merges`, after a prefill decision: None, or (replace (B, S) bool, states (B, S, d)):
        the kept slots whose hidden state (the input of layer K) becomes `states` there."""
        return None

    def static_image_tokens(self, n_img: int, n_layers: int) -> list[int] | None:
        """Image tokens seen by each decoder layer, if that does not depend on the data (for FLOPs
        without running a model); None for data-dependent policies."""
        counts = [n_img] * n_layers
        return counts

    # ---- parameters: the dataclass fields, declared once (a field with metadata {"spec": False} is
    # not a parameter, e.g. an object handed in from Python)
    @classmethod
    def params(cls) -> tuple[str, ...] | None:
        """The KEY names of the spec string, in order (None: any keys, the policy parses them itself)."""
        if not dataclasses.is_dataclass(cls):
            return ()  # a parameterless policy written as a plain class
        return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("spec", True))

    def spec(self) -> str:
        """The canonical spec string: NAME[:KEY=VALUE,...], parameters left at None omitted."""
        values = [(k, getattr(self, k)) for k in self.params() or ()]
        items = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values if v is not None]
        return self.name + (":" + ",".join(items) if items else "")

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "Policy":
        """Build from a spec's KEY=VALUE strings, each converted to its field's type (int, float, str,
        or X | None); missing keys take the field's default. ValueError on a value of the wrong type."""
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, text in params.items():
            kind = hints[key]
            if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            kwargs[key] = kind(text)  # int("2.5"), float("x"): ValueError, reported by parse_policy
        return cls(**kwargs)


class PreLLMPolicy(Policy):
    """A policy that reduces each image before the decoder (`reduce`); no in-LLM stage. Subclasses
    are frozen dataclasses with a `positions` field (None, renumber or keep; docs/design.md, "Stages")
    and call `super().__post_init__()` from their own."""

    pre_llm = True
    reads_tower = False  # True: `reduce` reads the vision tower (ImageView.tiles), not only the features

    def __post_init__(self):
        check_positions(self)

    def keep(self, stage: int, probe: Probe, state) -> None:
        return None  # no stage inside the decoder

    @abc.abstractmethod
    def reduce(self, view) -> Reduction:
        """The tokens that replace one image (`view`: adapters.vision.ImageView)."""

    def static_image_tokens(self, n_img: int, n_layers: int, passes: int = 1) -> list[int] | None:
        """As `Policy.static_image_tokens`, for an image the vision tower sees in `passes` passes
        (the base image and its anyres crops); None where the count depends on the image."""
        return None
