"""Pruning policies behind a name registry. A policy is given as a spec string
`NAME[:KEY=VALUE,...]`, e.g. `fastv:k=2,r=0.5`, `vtw:k=16`, `schedule:4=0.5,8=0.75`."""

from __future__ import annotations

from ..errors import PolicySpecError
from .base import Policy, PreLLMPolicy, Probe
from .dyrate import DyRate
from .dart import DART
from .divprune import DivPrune
from .dyrate_rnn import DyRateRNN
from .fastv import FastV
from .fixed import FixedRate
from .none import NoPruning
from .progressive import Progressive
from .prumerge import PruMerge, PruMergePlus
from .random_rank import RandomPruning
from .schedule import DepthSchedule
from .sparsevlm import SparseVLM
from .visionzip import VisionZip
from .vtw import VTW

# name -> class with `from_params(dict[str, str])`. Later policies register here too.
REGISTRY: dict[str, type[Policy]] = {
    "none": NoPruning,
    "fastv": FastV,
    "vtw": VTW,
    "fixed": FixedRate,
    "schedule": DepthSchedule,
    "progressive": Progressive,
    "random": RandomPruning,
    "dyrate": DyRate,
    "dyrate-rnn": DyRateRNN,
    "dart": DART,
    "sparsevlm": SparseVLM,
    # pre-LLM: each image's tokens are reduced before the decoder (engine/prellm.py)
    "divprune": DivPrune,
    "visionzip": VisionZip,
    "prumerge": PruMerge,
    "prumerge+": PruMergePlus,
}


def parse_policy(spec: str | Policy) -> Policy:
    """Turn a spec string into a policy object (a Policy passes through unchanged)."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise PolicySpecError(f"empty policy spec; known policies: {', '.join(REGISTRY)}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in REGISTRY:
        raise PolicySpecError(f"unknown policy {name!r}; known policies: {', '.join(REGISTRY)}")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise PolicySpecError(f"{spec!r}: parameter {item!r} is not KEY=VALUE")
        if key.strip() in params:
            raise PolicySpecError(f"{spec!r}: parameter {key.strip()!r} given twice")
        params[key.strip()] = value.strip()
    cls = REGISTRY[name]
    allowed = cls.params()
    if allowed is not None:
        unknown = set(params) - set(allowed)
        if unknown:
            raise PolicySpecError(
                f"{spec!r}: unknown parameter(s) {', '.join(sorted(unknown))} for {name} "
                f"(expected {', '.join(allowed) or 'none'})"
            )
    try:
        return cls.from_params(params)
    except PolicySpecError:
        raise
    except (ValueError, TypeError) as err:
        raise PolicySpecError(f"{spec!r}: bad parameter value ({err})") from None


__all__ = ["Policy", "PreLLMPolicy", "Probe", "REGISTRY", "parse_policy"]
