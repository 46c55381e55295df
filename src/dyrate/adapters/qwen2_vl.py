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
from .vision import ImageView, Tile


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

    # ------------------------------------------------------------------ pre-LLM views
    def image_views(self, vision: Vision, tower: bool = True) -> list[ImageView]:
        """One view per image, one tile: the tower's q / k of each block (read from the block's
        attention inputs with forward pre-hooks, removed on return; after the 2-D rotary, back in
        the processor's patch order where Qwen2.5-VL's windows reorder them), the merger's input
        per merged token (`ln_q` of its 2x2 patches, concatenated) and the merger's MLP."""
        if not tower:
            return super().image_views(vision, tower)
        visual = self.model.model.visual
        grid = vision["image_grid_thw"]  # (N, 3)
        seen: dict[int, tuple] = {}

        def grab(index):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                seen[index] = (x, kwargs["cu_seqlens"], kwargs["position_embeddings"])
            return hook

        handles = [blk.attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, blk in enumerate(visual.blocks)]
        try:
            out = visual(vision["pixel_values"].type(visual.dtype), grid_thw=grid)
        finally:
            for h in handles:
                h.remove()
        merge = visual.spatial_merge_size ** 2  # patches per merged token (consecutive in the processor's order)
        n_units = int(grid.prod(-1).sum()) // merge
        order = self._window_order(visual, grid, n_units)  # (U,) window position of each natural-order unit
        states = visual.merger.ln_q(out.last_hidden_state).view(n_units, -1)[order]  # (U, merge * dv), natural order
        features = out.pooler_output.split((grid.prod(-1) // merge).tolist())
        layers = {}

        def layer_qk(layer: int):  # every image's (P, H, Dh) q and k, natural order, and window ids (P,)
            if layer not in layers:
                x, cu, (cos, sin) = seen[layer]
                attn = visual.blocks[layer].attn
                p = x.shape[0]
                q, k, _ = attn.qkv(x).reshape(p, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = _rotary(attn)(q, k, cos, sin)
                window = torch.searchsorted(cu[1:].to(x.device), torch.arange(p, device=x.device), right=True)
                layers[layer] = tuple(t.view(n_units, merge, *t.shape[1:])[order].flatten(0, 1) for t in (q, k, window))
            return layers[layer]

        views, unit = [], 0
        for f in features:
            u = f.shape[0]
            lo, hi = unit * merge, (unit + u) * merge

            def qk(layer, lo=lo, hi=hi):
                q, k, _ = layer_qk(layer)
                return q[lo:hi], k[lo:hi]

            def windows(layer, lo=lo, hi=hi):
                ids = layer_qk(layer)[2][lo:hi]
                return None if bool((ids == ids[0]).all()) else ids

            tile = Tile(states[unit:unit + u], torch.arange(u, device=f.device), qk, None, merge, windows)
            views.append(ImageView(f, [tile], len(visual.blocks), len(visual.blocks) - 1, visual.merger.mlp))
            unit += u
        return views

    @staticmethod
    def _window_order(visual, grid: torch.Tensor, n_units: int) -> torch.Tensor:
        """(U,) where each merged token (processor order) sits in the tower's sequence: Qwen2.5-VL
        reorders them into attention windows (`get_vision_window_index`); Qwen2-VL does not."""
        if not hasattr(visual, "window_size"):
            return torch.arange(n_units, device=grid.device)
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        return torch.argsort(window_index)


def _rotary(attn):
    """The vision rotary of the attention module's own family (Qwen2-VL / Qwen2.5-VL)."""
    import importlib

    return importlib.import_module(type(attn).__module__).apply_rotary_pos_emb_vision
