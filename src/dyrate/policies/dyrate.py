"""DyRate (learned rate): at every step a predictor maps the probe's share vector (sys, img, ins, res)
to logits over B reduction rates {0, 1/B, ..., (B-1)/B}; the argmax bin i keeps
ceil((1 - i/B) * n_img) image tokens from layer K on. `q=Q` (our extension) takes the Q-quantile
bin of the predicted distribution instead of the argmax: the lowest bin whose cumulative
probability reaches Q, a knob between quality and cost that needs no retraining. `cap=C` (ours)
keeps at most a fraction C of the image tokens at any step (a ceiling on the learned budget: the
rate is at least 1 - C). `every=N` (ours, MLP predictors) decides at the prefill and at every N-th
decode step only: a shrinking kept set then shrinks a little later, and the steps between cost
nothing extra.
`dyrate:k=K,predictor=FILE` uses an MLP on the current share vector; `dyrate-rnn` (dyrate_rnn.py)
a GRU over the last N share vectors. A predictor file with `decide: prefill` (our extension) picks
one rate per prompt at prefill and keeps it: no probe at decode steps, as FastV; one with
`decide: shrink` (our extension) decides at every step for the rest of the answer, the way evict
mode's shrinking kept set needs. Without
predictor=, the predictor shipped for the built-in testbed model is used (`dyrate.assets`).

The predictor file (see `dyrate.learn.predictors`) is read when the policy is built; the settings
it carries (`defaults`: q, cap, every) apply where the spec leaves them out. Checks: its arch, its
probe layer K (k= may be left out: the predictor's own K is used), `validate(n_layers)` against the
decoder depth it was trained for, and the full model fingerprint (decoder shape and image-token
count) through `check_model`, which the engine calls with the model before generating.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..assets import predictor_path
from ..errors import PolicySpecError
from ..learn.predictors import RatePredictor, check_predictor, feature_vector, load_predictor
from ..rates import keep_counts
from .base import Policy, Probe, check_layer, prefill_ranking


@dataclass(frozen=True)
class DyRate(Policy):
    k: int | None = None  # None: the predictor's own K
    predictor: str = ""  # a predictor file; "": the one shipped for the built-in model
    q: float | None = None  # None: argmax bin; else the q-quantile bin of the predicted distribution
    cap: float | None = None  # None: no cap; else no step keeps more than this fraction of the image tokens
    every: int | None = None  # None: every step; N: the prefill and every N-th decode step (MLP only)
    net: object = field(default=None, compare=False, repr=False, metadata={"spec": False})  # a loaded RatePredictor
    name = "dyrate"
    arch = "mlp"

    def __post_init__(self):
        if self.net is None:
            if not self.predictor:  # the predictor shipped for the built-in testbed model
                object.__setattr__(self, "predictor", str(predictor_path(self.arch)))
            object.__setattr__(self, "net", load_predictor(self.predictor))
        if not isinstance(self.net, RatePredictor):
            raise PolicySpecError(f"{self.name}: net must be a RatePredictor")
        if self.net.config.arch != self.arch:
            raise PolicySpecError(
                f"{self.name}: predictor {self.predictor or '(given)'} is a {self.net.config.arch!r} predictor; "
                f"use {'dyrate' if self.net.config.arch == 'mlp' else 'dyrate-rnn'}"
            )
        if self.k is None:
            object.__setattr__(self, "k", self.net.config.k)
        for key, value in (self.net.config.defaults or {}).items():  # the file's settings, where the spec is silent
            if getattr(self, key) is None:
                object.__setattr__(self, key, int(value) if key == "every" else float(value))
        if self.q is not None and not 0.0 < self.q < 1.0:
            raise PolicySpecError(f"{self.name}: q={self.q} must lie in (0, 1) (leave it out for the argmax bin)")
        if self.cap is not None and not 0.0 < self.cap <= 1.0:
            raise PolicySpecError(f"{self.name}: cap={self.cap} must lie in (0, 1] (the most image tokens a step keeps, as a fraction)")
        if self.every is not None and self.every < 1:
            raise PolicySpecError(f"{self.name}: every={self.every} must be >= 1")
        if self.every not in (None, 1) and self.arch != "mlp":
            raise PolicySpecError(f"{self.name}: every={self.every} needs an MLP predictor (a GRU reads every step)")
        check_layer(self.k)
        check_predictor(None, self.net, k=self.k, name=f"predictor {self.predictor or '(given)'}")
        self.net.eval()

    @property
    def stages(self) -> tuple[int, ...]:
        return (self.k,)

    @property
    def decode_probe(self) -> bool:  # type: ignore[override]
        # "prefill": the prefill's rate holds for the answer; without the share vector and with the
        # prefill's ranking a decision reads only the hidden state (decode_decides)
        return self.net.config.decide != "prefill" and self.net.config.needs_probe

    @property
    def decode_decides(self) -> bool:  # type: ignore[override]
        return self.net.config.decide != "prefill" and not self.net.config.needs_probe

    @property
    def prefill_ranked(self) -> bool:  # type: ignore[override]
        return self.net.config.rank == "prefill" or self.net.config.decide == "prefill"

    @property
    def bins(self) -> int:
        return self.net.config.bins

    def validate(self, n_layers: int) -> None:
        super().validate(n_layers)
        fp = self.net.config.fingerprint or {}
        if fp.get("num_hidden_layers") not in (None, n_layers):
            raise PolicySpecError(
                f"{self.spec()}: the predictor was trained for a {fp['num_hidden_layers']}-layer decoder, "
                f"this one has {n_layers}"
            )

    def check_model(self, model) -> None:
        check_predictor(model, self.net, k=self.k, name=f"predictor {self.predictor or '(given)'}")

    def init_state(self, batch: int, device) -> dict[str, torch.Tensor]:
        return self.net.init_state(batch, device)

    def _check_n_img(self, probe: Probe) -> None:
        fp = self.net.config.fingerprint or {}
        want = fp.get("n_img")
        if want is not None and bool((probe.n_img != want).any()):
            raise PolicySpecError(
                f"{self.spec()}: the predictor was trained for {want} image tokens per image, "
                f"this model gives {int(probe.n_img.max())}"
            )

    def decides_at(self, step: int) -> bool:
        return self.every is None or step % self.every == 0  # between decisions: no probe, no predictor

    def keep(self, stage: int, probe: Probe, state) -> torch.Tensor | None:
        if probe.step == 0:
            self._check_n_img(probe)
        elif not self.decides_at(probe.step):
            return None  # between decisions the kept set holds (the engine does not ask there)
        net = self.net
        param = next(net.parameters())
        if param.device != probe.n_img.device:
            net.to(probe.n_img.device)
        x = feature_vector(probe.shares, probe.step, net.config.features, probe.hidden)  # (B, F)
        logits = net.step(x, state)  # (B, bins)
        if self.q is None:
            bin_ = logits.argmax(-1)  # (B,)
        else:  # the lowest bin whose cumulative probability reaches q: a lower q prunes less
            cdf = logits.float().softmax(-1).cumsum(-1)  # (B, bins)
            bin_ = (cdf < self.q).sum(-1).clamp(max=self.bins - 1)
        rate = bin_.float() / self.bins  # (B,) i / B
        if self.cap is not None:  # at least 1 - cap of the image tokens go, whatever the bin
            rate = rate.clamp(min=1.0 - self.cap)
        state["rate"] = rate  # the chosen rate, for the trace (see rate())
        return keep_counts(rate, probe.n_img)

    def scores(self, stage: int, probe: Probe, state) -> torch.Tensor:
        """The probe's attention (rank "step"), or the prefill's for every step (rank "prefill")."""
        if self.net.config.rank == "step":
            return probe.img_scores
        return prefill_ranking(probe, state)

    def rate(self, stage: int, probe: Probe, keep: torch.Tensor, state) -> torch.Tensor:
        return state["rate"]

    def static_image_tokens(self, n_img: int, n_layers: int) -> None:
        return None  # data-dependent
