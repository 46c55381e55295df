"""Small helpers on the prompt's columns and vision inputs (engine/loop.py)."""

from __future__ import annotations

import torch

from ..adapters import IMG


def image_ordinals(group: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(B, P) groups and each image's token count (batch order) -> (B, P) long: the ordinal of the
    image each image column belongs to (0, 1, ... within its row), -1 elsewhere."""
    is_img = group == IMG
    out = torch.full_like(group, -1)
    images = iter(counts)
    for row, total in enumerate(is_img.sum(1).tolist()):
        ordinals = []
        while len(ordinals) < total:
            ordinals += [len(set(ordinals))] * next(images, total)
        out[row, is_img[row]] = torch.tensor(ordinals[:total], dtype=out.dtype, device=out.device)
    return out


def as_vision(vision) -> dict[str, torch.Tensor]:
    """The vision inputs as a dict; a bare tensor is LLaVA's pixel_values."""
    return {"pixel_values": vision} if isinstance(vision, torch.Tensor) else dict(vision)
