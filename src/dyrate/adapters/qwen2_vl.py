"""Adapter for the Qwen2-VL family: `Qwen2VLForConditionalGeneration` and
`Qwen2_5_VLForConditionalGeneration`.

Positions are 3-D (M-RoPE: temporal, height, width). The prompt's come from the model's own
`get_rope_index` (text tokens: one position on all three axes, counting on; an image's tokens: its
grid after the vision merger), so every kept token keeps its original position on every axis
after pruning or eviction; a generated token is the row's last position + 1 on every axis, which
is what `model.generate` computes (`cache_position + rope_deltas`). Pruning acts on the tokens after
the vision merger (one token per 2x2 patches). Images of different sizes give rows with different
image-token counts; the processor flattens every image's patches into one `pixel_values` tensor,
so `repeat_rows` splits it by each row's images' `image_grid_thw`."""

from __future__ import annotations

import torch

from .base import DecoderAdapter, Vision


class Qwen2VLAdapter(DecoderAdapter):
    def _image_features(self, vision: Vision):
        return self.model.model.get_image_features(
            pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"], return_dict=True,
        ).pooler_output

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: Vision) -> torch.Tensor:
        # token types as the processor marks them (1 = image token), from the ids themselves, so a
        # prompt cut short (lmms-eval's context) needs no matching cut of the processor's field
        types = (input_ids == self.image_token_id).int()  # (B, P)
        pos, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=types, image_grid_thw=vision["image_grid_thw"], attention_mask=attention_mask,
        )
        return pos  # (3, B, P), left padding at 0

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        return self._rotary(hidden, position_ids=positions)  # (3, B, q) -> cos, sin (B, q, head_dim)

    def repeat_rows(self, vision: Vision, n: int, images_per_row: list[int] | None = None) -> dict[str, torch.Tensor]:
        grid = vision["image_grid_thw"]  # (N_img, 3): patches per image = t * h * w
        per_row = images_per_row or [1] * grid.shape[0]
        rows_grid = grid.split(per_row)  # each row's images
        patches = [int(g.prod(-1).sum()) for g in rows_grid]
        rows_pixels = vision["pixel_values"].split(patches)  # each row's flattened patches (n_patches, C*p*p)
        out = {k: v.repeat_interleave(n, dim=0) for k, v in vision.items() if k not in ("pixel_values", "image_grid_thw")}
        out["pixel_values"] = torch.cat([px for px in rows_pixels for _ in range(n)])
        out["image_grid_thw"] = torch.cat([g for g in rows_grid for _ in range(n)])
        return out
