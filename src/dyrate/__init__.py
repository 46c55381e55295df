"""dyrate: prune visual tokens inside a VLM's language decoder, with a rate that can change at
every generated token (DyRate) and the baselines it is compared with (FastV, VTW, fixed, schedules).

    import dyrate
    model, processor = dyrate.load("path/to/llava-checkpoint")
    [out] = dyrate.generate(model, processor, ["cat.png"], ["Describe the image."], policy="fastv:k=2,r=0.5")
    print(out.text, out.flops["prefill"]["ratio"], out.retained)
"""

from .api import GenerationResult, generate, load
from .errors import CheckpointError, DyrateError, InputError, PolicySpecError
from .policies import REGISTRY as POLICIES
from .policies import Policy, parse_policy

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DyrateError",
    "GenerationResult",
    "InputError",
    "POLICIES",
    "Policy",
    "PolicySpecError",
    "generate",
    "load",
    "parse_policy",
]
