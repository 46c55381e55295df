"""Model adapters: everything the engine needs to know about one VLM family, behind one small
interface (`ModelAdapter`). The engine never touches model internals beyond it, so LLaVA-NeXT or
Qwen2-VL adapters plug in without engine changes.

Token groups (docs/design.md, "Token groups"): every prompt position is `sys` (before the first image
token), `img` (an image token) or `ins` (any other prompt token after the first image); generated
tokens are `res`; left padding is `pad`. Adapters label prompts with these ids (`token_groups`)."""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import CheckpointError

SYS, IMG, INS, RES, PAD = 0, 1, 2, 3, 4
GROUPS = ("sys", "img", "ins", "res")  # names of the ids 0..3 (pad has none: it is never attended)


class ModelAdapter(Protocol):
    model: torch.nn.Module
    n_layers: int  # decoder layers
    layers: torch.nn.ModuleList  # called as layer(hidden, attention_mask=, position_embeddings=, position_ids=, <cache_kwarg>=, use_cache=)
    cache_kwarg: str  # the layers' name for the KV cache argument ("cache", or "past_key_values" before transformers 5.24)
    max_positions: int

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, P) ids + images -> (B, P, d) input embeddings with image features in place."""

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, q) ids -> (B, q, d)."""

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """Position embeddings for (B, q) positions, as the decoder layers expect them."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, q, d) last hidden states -> (B, q, V) float logits (final norm + head)."""

    def token_groups(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, P) group id per prompt token: SYS, IMG, INS, or PAD for left padding."""


def adapter_for(model) -> ModelAdapter:
    """Pick the adapter for a loaded model."""
    from transformers import LlavaForConditionalGeneration

    from .llava import LlavaAdapter

    if isinstance(model, LlavaForConditionalGeneration):
        return LlavaAdapter(model)
    raise CheckpointError(f"{type(model).__name__} is not supported yet (supported: LlavaForConditionalGeneration)")


__all__ = ["GROUPS", "IMG", "INS", "PAD", "RES", "SYS", "ModelAdapter", "adapter_for"]
