"""Rate predictors: share vector(s) -> logits over B discrete reduction rates {0, 1/B, ..., (B-1)/B}.

Two architectures:
- `mlp`: the current share vector (sys, img, ins, res) (+ optional extra features) -> MLP -> B logits.
- `gru`: a GRU over the last N feature vectors (N = `history`; the window is zero-padded at the
  front until N steps have been seen, in training and at inference alike) -> B logits. `history=0`
  means an unbounded recurrence: the GRU's hidden state is carried from step to step.

Features (`features`, concatenated in the order given): `shares` (4 values), `step` (log1p of the
decode step; 0 at prefill) and `hidden` (the newest token's hidden state after the probe layer K-1,
RMS-normalised without weights: `model_dim` values). A predictor without `shares` and with the
prefill's ranking needs no probe at decode steps (`needs_probe`): only the hidden state, which the
decoder computes anyway. `hidden` is our extension,
not the paper's: it tells the predictor *which* token it is about to predict (after "a large" the
model needs the image, after "at the" too, after "and" it does not), which the share vector alone
does not (docs/dyrate.md).

Ranking (`rank`): the image tokens a bin keeps are the top of each step's probe (`step`, as in
docs/design.md) or of the prefill's probe, the last prompt token's, as FastV ranks (`prefill`, our
extension: with it only the count varies from step to step). Training and inference use the same.

Decision (`decide`): a rate at every step (`step`, DyRate); one rate per prompt, picked at prefill
from the last prompt token's probe and kept for the whole answer (`prefill`, our extension: a
learned per-image FastV rate, which evict mode turns into a smaller prefill and KV cache); or a
rate at every step trained to serve the rest of the answer (`shrink`, our extension, for evict
mode: its labels are suffix minima of the per-step oracle bins, so the prefill keeps the
prompt's budget and the kept set shrinks as the answer proceeds; docs/design.md, "Rates that save").

A predictor file is one safetensors file: the weights, plus a JSON object under the header's
`dyrate` metadata key (arch, bins, probe layer k, features, history, hidden size, the model
fingerprint, and optionally `defaults`: the policy settings chosen for it on validation data, e.g.
{"q": 0.05, "cap": 0.5, "every": 8}, which `dyrate:predictor=FILE` uses unless the spec sets them).
Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, PolicySpecError

ARCHS = ("mlp", "gru")
FEATURES = ("shares", "step", "hidden")
POLICY_DEFAULTS = ("q", "cap", "every")  # policy parameters a predictor file may carry (PredictorConfig.defaults)
RANKS = ("step", "prefill")
DECIDES = ("step", "prefill", "shrink")
META_KEY = "dyrate"
FORMAT_VERSION = 1


class PredictorFileError(CheckpointError, PolicySpecError):
    """A predictor file that cannot be used. Both a CheckpointError and a PolicySpecError, so a
    policy spec naming it reports the file's own one-line message."""


LIMITS = {"bins": 1000, "k": 10_000, "history": 100_000, "hidden": 8192, "model_dim": 65_536}  # sane upper bounds

SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")


# ---------------------------------------------------------------- model fingerprint


def image_token_count(config) -> int | None:
    """Image tokens per image of a LLaVA config (patches, plus the CLS token for strategy 'full');
    None for the families whose count depends on the image (LLaVA-NeXT, OneVision, Qwen2-VL)."""
    if getattr(config, "model_type", "llava") != "llava":
        return None
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        n += 1
    return int(n)


def model_fingerprint(model_or_config) -> dict:
    """Shape fields of the decoder, the image-token count, and a short hash of both. Families other
    than LLaVA-1.5 also record their model_type (LLaVA-1.5 files predate the field and keep their
    hash), so two families with one decoder shape are told apart."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config()
    fields = {name: getattr(text, name, None) for name in SHAPE_FIELDS}
    if fields["head_dim"] is None and fields["hidden_size"] and fields["num_attention_heads"]:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    fields["n_img"] = image_token_count(config)
    if getattr(config, "model_type", "llava") != "llava":
        fields["model_type"] = config.model_type
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"hash": digest, **fields}


# ---------------------------------------------------------------- the module


@dataclass(frozen=True)
class PredictorConfig:
    arch: str = "mlp"
    bins: int = 10
    k: int = 2  # first pruned layer; the probe reads layer k-1
    features: tuple[str, ...] = ("shares",)
    history: int = 8  # gru: window length N (0: unbounded recurrence)
    hidden: int = 32
    fingerprint: dict | None = None  # model_fingerprint() of the model it was trained for
    model_dim: int = 0  # the decoder's hidden size (feature `hidden` only)
    rank: str = "step"  # which probe ranks the image tokens: each step's ("step") or the prefill's ("prefill")
    decide: str = "step"  # a rate at every step ("step"), one per prompt at prefill ("prefill"), or a shrinking one ("shrink")
    defaults: dict | None = None  # policy settings the file suggests (q, cap, every), used where a spec leaves them out

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise PolicySpecError(f"predictor arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        for name, top in LIMITS.items():  # bounds first: a corrupt file must not allocate gigabytes
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                raise PolicySpecError(f"predictor {name}={value!r}: expected an integer in 0..{top}")
        if self.bins < 2:
            raise PolicySpecError(f"predictor bins={self.bins}: need at least 2 rate bins")
        if self.k < 1:
            raise PolicySpecError(f"predictor k={self.k}: the first pruned layer must be >= 1")
        if not self.features or any(f not in FEATURES for f in self.features):
            raise PolicySpecError(f"predictor features {list(self.features)}: expected one or more of {FEATURES}")
        if len(set(self.features)) != len(self.features):
            raise PolicySpecError(f"predictor features {list(self.features)}: a feature is repeated")
        if "hidden" in self.features and self.model_dim < 1:
            raise PolicySpecError("predictor feature 'hidden' needs the decoder's hidden size (model_dim)")
        if self.rank not in RANKS:
            raise PolicySpecError(f"predictor rank {self.rank!r} is not one of {', '.join(RANKS)}")
        if self.decide not in DECIDES:
            raise PolicySpecError(f"predictor decide {self.decide!r} is not one of {', '.join(DECIDES)}")
        if self.defaults is not None:
            if not isinstance(self.defaults, dict) or set(self.defaults) - set(POLICY_DEFAULTS) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.defaults.values()):
                raise PolicySpecError(f"predictor defaults {self.defaults!r}: expected numbers for any of {POLICY_DEFAULTS}")
        if self.history < 0 or self.hidden < 1:
            raise PolicySpecError(f"predictor history={self.history}, hidden={self.hidden}: need history >= 0, hidden >= 1")

    @property
    def in_dim(self) -> int:
        return 4 * ("shares" in self.features) + ("step" in self.features) + (self.model_dim if "hidden" in self.features else 0)

    @property
    def needs_probe(self) -> bool:
        """Does a decision read the probe's attention (the share vector, or each step's ranking)? A
        predictor on `hidden` / `step` with the prefill's ranking decides at decode steps without one."""
        return "shares" in self.features or self.rank == "step"


def feature_vector(shares: torch.Tensor | None, step: torch.Tensor | int, features: tuple[str, ...],
                   hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The predictor input (..., F) float32, its parts in the order of `features`: `shares` (..., 4)
    the share vector, `step` log1p of the step (scalar or (...) tensor), `hidden` (..., d) the states
    after layer K-1, RMS-normalised. `shares` may be None when the features leave it out."""
    lead = shares if shares is not None else hidden
    if lead is None:
        raise PolicySpecError("this predictor reads the probe layer's hidden state; none was given")
    batch, device = lead.shape[:-1], lead.device
    parts = []
    for name in features:
        if name == "shares":
            if shares is None:
                raise PolicySpecError("this predictor reads the share vector; no probe was run")
            parts.append(shares.float())
        elif name == "step":
            s = torch.as_tensor(step, dtype=torch.float32, device=device)
            parts.append(torch.log1p(s).expand(batch).unsqueeze(-1))
        elif name == "hidden":
            if hidden is None:
                raise PolicySpecError("this predictor reads the probe layer's hidden state; none was given")
            h = hidden.float()
            parts.append(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))  # (..., d), unit RMS
    return torch.cat(parts, dim=-1)


class RatePredictor(nn.Module):
    """logits over `bins` reduction rates. Use `forward_sequence` in training (whole sequences) and
    `step` at inference (one vector per row, state carried by the caller)."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        c = config
        if c.arch == "mlp":
            self.net = nn.Sequential(nn.Linear(c.in_dim, c.hidden), nn.GELU(), nn.Linear(c.hidden, c.hidden),
                                     nn.GELU(), nn.Linear(c.hidden, c.bins))
        else:
            self.gru = nn.GRU(c.in_dim, c.hidden, batch_first=True)
            self.head = nn.Linear(c.hidden, c.bins)

    @property
    def bins(self) -> int:
        return self.config.bins

    def rates(self) -> torch.Tensor:
        """(bins,) the reduction rate of each bin: i / B."""
        return torch.arange(self.config.bins, dtype=torch.float32) / self.config.bins

    # training: x (B, T, F) -> (B, T, bins); position t sees x[:, :t+1] (gru) or x[:, t] (mlp)
    def forward_sequence(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.arch == "mlp":
            return self.net(x)
        n = self.config.history
        if n == 0:
            out, _ = self.gru(x)  # (B, T, H)
            return self.head(out)
        b, t, f = x.shape
        padded = torch.cat([x.new_zeros(b, n - 1, f), x], dim=1)  # (B, T+N-1, F)
        windows = padded.unfold(1, n, 1).permute(0, 1, 3, 2).reshape(b * t, n, f)  # (B*T, N, F)
        out, _ = self.gru(windows)  # (B*T, N, H)
        return self.head(out[:, -1]).view(b, t, -1)

    forward = forward_sequence

    # inference: one vector per row
    def init_state(self, batch: int, device) -> dict[str, torch.Tensor]:
        c = self.config
        if c.arch == "mlp":
            return {}
        if c.history == 0:
            return {"gru_hidden": torch.zeros(batch, c.hidden, device=device)}  # (B, H)
        return {"gru_window": torch.zeros(batch, c.history, c.in_dim, device=device)}  # (B, N, F)

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """x: (B, F) -> logits (B, bins); updates `state` (from init_state) in place."""
        if self.config.arch == "mlp":
            return self.net(x)
        if self.config.history == 0:
            out, h = self.gru(x[:, None, :], state["gru_hidden"][None].contiguous())  # out (B, 1, H)
            state["gru_hidden"] = h[0]
            return self.head(out[:, -1])
        window = torch.cat([state["gru_window"][:, 1:], x[:, None, :]], dim=1)  # (B, N, F)
        state["gru_window"] = window
        out, _ = self.gru(window)
        return self.head(out[:, -1])


def new_predictor(arch: str = "mlp", bins: int = 10, k: int = 2, features=("shares",), history: int = 8,
                  hidden: int = 32, model=None, seed: int = 0, model_dim: int | None = None,
                  rank: str = "step", decide: str = "step") -> RatePredictor:
    """A freshly initialised predictor (fingerprint and, for feature `hidden`, the decoder's hidden
    size taken from `model` when given; `model_dim` overrides the latter)."""
    fingerprint = model_fingerprint(model) if model is not None else None
    if model_dim is None:
        model_dim = fingerprint["hidden_size"] if fingerprint is not None else 0
    model_dim = model_dim if "hidden" in features else 0
    config = PredictorConfig(arch, bins, k, tuple(features), history, hidden, fingerprint, model_dim, rank, decide)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RatePredictor(config)


# ---------------------------------------------------------------- files


def save_predictor(predictor: RatePredictor, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise PredictorFileError(f"{path}: a predictor file must end in .safetensors")
    meta = {"format": FORMAT_VERSION, **asdict(predictor.config)}
    meta["features"] = list(predictor.config.features)
    state = {k: v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def read_safetensors(path: str | Path, what: str = "predictor file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; CheckpointError for anything else
    (wrong extension, missing, not parseable). Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise PredictorFileError(f"{path}: a {what} must be a .safetensors file (other formats are refused)")
    if not path.is_file():
        raise PredictorFileError(f"{path}: no such {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise PredictorFileError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    return tensors, meta


def load_predictor(path: str | Path) -> RatePredictor:
    tensors, meta = read_safetensors(path)
    if META_KEY not in meta:
        raise PredictorFileError(f"{path}: a safetensors file without dyrate predictor metadata")
    try:
        m = json.loads(meta[META_KEY])
        if m.pop("format", None) != FORMAT_VERSION:
            raise ValueError("unknown format version")
        m["features"] = tuple(m["features"])
        config = PredictorConfig(**m)
    except (ValueError, TypeError, KeyError, PolicySpecError) as err:
        raise PredictorFileError(f"{path}: bad predictor metadata ({err})") from None
    predictor = RatePredictor(config)
    try:
        predictor.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise PredictorFileError(f"{path}: weights do not match the predictor metadata ({str(err).splitlines()[0]})") from None
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise PredictorFileError(f"{path}: non-finite weights (NaN or inf) in {', '.join(sorted(bad)[:3])}")
    return predictor.eval()


def check_predictor(model, predictor: RatePredictor, k: int | None = None, bins: int | None = None,
                    name: str = "predictor") -> None:
    """Refuse a predictor trained for another model (decoder shape or image-token count), another
    probe layer `k` or another number of rate bins. One-line CheckpointError / PolicySpecError."""
    c = predictor.config
    if k is not None and k != c.k:
        raise PolicySpecError(f"{name} was trained for k={c.k}, not k={k}")
    if bins is not None and bins != c.bins:
        raise PolicySpecError(f"{name} has {c.bins} rate bins, not {bins}")
    if model is None:
        return
    if c.fingerprint is None:
        raise CheckpointError(f"{name} has no model fingerprint; cannot check it against the model")
    here = model_fingerprint(model)
    if here["hash"] != c.fingerprint.get("hash"):
        diff = [f"{key}={c.fingerprint.get(key)} (model: {here[key]})" for key in here
                if key != "hash" and here[key] != c.fingerprint.get(key)]
        raise CheckpointError(f"{name} was trained for another model: {', '.join(diff) or 'fingerprint differs'}")
    if "hidden" in c.features and c.model_dim != here["hidden_size"]:
        raise CheckpointError(f"{name} reads {c.model_dim}-dim hidden states, the model's are {here['hidden_size']}")
    if c.k >= here["num_hidden_layers"]:
        raise PolicySpecError(f"{name}: k={c.k} must be < the decoder's {here['num_hidden_layers']} layers")


def bin_keep_fraction(bins: int) -> torch.Tensor:
    """(bins,) fraction of image tokens kept by each bin before rounding: 1 - i/B."""
    return 1.0 - torch.arange(bins, dtype=torch.float32) / bins


__all__ = [
    "ARCHS",
    "PredictorConfig",
    "PredictorFileError",
    "RatePredictor",
    "check_predictor",
    "feature_vector",
    "image_token_count",
    "load_predictor",
    "model_fingerprint",
    "new_predictor",
    "save_predictor",
]
