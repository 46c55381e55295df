"""The engine: one decoding loop that owns the decoder layers (`loop.Engine`: prefill and decode
steps, probe, kept sets, eviction and masks) and token-level decoding on top of it
(`generation`: greedy, sampling, beam search, teacher forcing). Model specifics come through
`dyrate.adapters`, pruning decisions through `dyrate.policies`."""

from .generation import GenerationOptions, RowOutput, forced_logprobs, generate_tokens
from .loop import MODES, DecodeState, Engine, Segment

__all__ = ["MODES", "DecodeState", "Engine", "GenerationOptions", "RowOutput", "Segment", "forced_logprobs", "generate_tokens"]
