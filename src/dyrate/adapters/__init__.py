"""Model adapters: everything the engine needs to know about one VLM family, behind one small
interface (`ModelAdapter`). The engine never touches model internals beyond it, so LLaVA-NeXT or
Qwen2-VL adapters plug in without engine changes.

Token groups (docs/design.md, "Token groups"): every prompt position is `sys` (before the first image
token), `img` (an image token) or `ins` (any other prompt token after the first image); generated
tokens are `res`; left padding is `pad`. Adapters label prompts with these ids (`token_groups`)."""

from __future__ import annotations

from typing import Mapping, Protocol

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

    def embed(self, input_ids: torch.Tensor, vision: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, P) ids + vision inputs (the processor's outputs besides ids and mask) -> (B, P, d)
        input embeddings with image features in place."""

    def embed_counts(self, input_ids: torch.Tensor, vision) -> tuple[torch.Tensor, list[int]]:
        """`embed`, and the image tokens of each image of the batch, in order."""

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, q) ids -> (B, q, d)."""

    def image_views(self, vision: Mapping[str, torch.Tensor], tower: bool = True) -> list:
        """One `adapters.vision.ImageView` per image, in order, for a pre-LLM policy; with `tower`
        its tiles (the vision tower's passes) where the family exposes them."""

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision) -> torch.Tensor:
        """RoPE positions of the prompt: (A, B, P) long, A axes (1, or 3 for M-RoPE)."""

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        """Position embeddings for (A, B, q) positions, as the decoder layers expect them."""

    def repeat_rows(self, vision, n: int, images_per_row: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Vision inputs with every row repeated n times in place (beam search)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, q, d) last hidden states -> (B, q, V) float logits (final norm + head)."""

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm on (..., d) states."""

    def token_groups(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, P) group id per prompt token: SYS, IMG, INS, or PAD for left padding."""


def _families():
    """(model class, adapter class) per supported family, most specific first."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    from .llava import LlavaAdapter, LlavaNextAdapter
    from .qwen2_vl import Qwen2VLAdapter

    return (
        (LlavaForConditionalGeneration, LlavaAdapter),
        (LlavaNextForConditionalGeneration, LlavaNextAdapter),
        (LlavaOnevisionForConditionalGeneration, LlavaNextAdapter),
        (Qwen2VLForConditionalGeneration, Qwen2VLAdapter),
        (Qwen2_5_VLForConditionalGeneration, Qwen2VLAdapter),
    )


def supported_names() -> list[str]:
    return [cls.__name__ for cls, _ in _families()]


def model_class_for(config):
    """The supported model class a checkpoint's config builds, or None."""
    for cls, _ in _families():
        if type(config) is cls.config_class:
            return cls
    return None


def adapter_for(model) -> ModelAdapter:
    """Pick the adapter for a loaded model by its class."""
    for cls, adapter in _families():
        if isinstance(model, cls):
            return adapter(model)
    raise CheckpointError(f"{type(model).__name__} is not supported (supported: {', '.join(supported_names())})")


__all__ = ["GROUPS", "IMG", "INS", "PAD", "RES", "SYS", "ModelAdapter", "adapter_for", "model_class_for", "supported_names"]
