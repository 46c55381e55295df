"""What every adapter shares: a Hugging Face VLM whose language model is a stack of decoder layers
with RoPE, whose image features replace placeholder tokens of one id (`config.image_token_id`), and
whose vision inputs are the processor's outputs besides `input_ids` and `attention_mask`.

A family adapter subclasses `DecoderAdapter` and says how its vision tower is called
(`_image_features`), and where it differs, how positions are computed (`positions`, `rotary`) and
how vision inputs are repeated for beams (`repeat_rows`). See docs/models.md."""

from __future__ import annotations

import abc
import inspect
from typing import Mapping

import torch

from . import IMG, INS, PAD, SYS
from .attention import install

Vision = Mapping[str, torch.Tensor]  # processor outputs besides input_ids / attention_mask


class DecoderAdapter(abc.ABC):
    """The language decoder is `model.model.language_model` (layers, norm, rotary_emb), the head
    `model.lm_head`; subclasses add the vision side."""

    def __init__(self, model):
        install(model)  # dyrate's attention in the language decoder (plain SDPA unless probed)
        self.model = model
        self.config = model.config
        lm = model.model.language_model
        text = model.config.get_text_config()
        self.n_layers = text.num_hidden_layers
        self.layers = lm.layers
        # transformers 5.24 renamed the decoder layer's `past_key_values=` to `cache=` (the old name
        # warns until its removal in 5.40); 5.23 knows only the old one.
        params = inspect.signature(lm.layers[0].forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._norm, self._rotary, self._head = lm.norm, lm.rotary_emb, model.lm_head
        self._embed = model.get_input_embeddings()
        self.image_token_id = model.config.image_token_id
        self.max_positions = getattr(text, "max_position_embeddings", None) or 2**31

    # ------------------------------------------------------------------ embeddings
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._embed(input_ids)

    def embed(self, input_ids: torch.Tensor, vision: Vision) -> torch.Tensor:
        """(B, P) ids + vision inputs -> (B, P, d) input embeddings with the image features in the
        image-token slots, in order (as the model's own forward places them)."""
        return self.embed_counts(input_ids, vision)[0]

    def embed_counts(self, input_ids: torch.Tensor, vision: Vision) -> tuple[torch.Tensor, list[int]]:
        """`embed`, and the image tokens of each image of the batch, in order."""
        embeds = self._embed(input_ids)  # (B, P, d)
        feats = list(self._image_features(vision))  # one (n_i, d) tensor per image
        flat = torch.cat(feats, dim=0).to(embeds.device, embeds.dtype)  # (sum n_i, d)
        slots = (input_ids == self.image_token_id).unsqueeze(-1)  # (B, P, 1)
        return embeds.masked_scatter(slots, flat), [f.shape[0] for f in feats]

    @abc.abstractmethod
    def _image_features(self, vision: Vision):
        """One (n_i, d) decoder-ready feature tensor per image of the batch, in order."""

    def image_views(self, vision: Vision, tower: bool = True) -> list:
        """One `ImageView` per image of the batch, in order (pre-LLM reduction); `tower=False`: the
        decoder-ready features only, no tiles (a policy that does not read the tower). Default:
        the features only (no vision-tower internals)."""
        from .vision import ImageView

        return [ImageView(f) for f in self._image_features(vision)]

    # ------------------------------------------------------------------ positions
    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: Vision) -> torch.Tensor:
        """RoPE positions of the prompt, (A, B, P) long with A axes (1 for 1-D RoPE), left padding
        at 0. Default: `cumsum(attention_mask) - 1`, as `model.generate` computes it. A generated
        token's position is the row's last position + 1 on every axis (engine/loop.py)."""
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        return pos[None]

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        """Position embeddings (cos, sin) for (A, B, q) positions, as the decoder layers take them."""
        return self._rotary(hidden, position_ids=positions[0])

    PER_IMAGE = ("pixel_values", "image_sizes", "image_grid_thw")  # vision inputs with one entry per image

    def repeat_rows(self, vision: Vision, n: int, images_per_row: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Vision inputs with every row repeated n times in place (beam search: B rows -> B*n).
        Per-image inputs (`PER_IMAGE`, the batch's images in row order) repeat each row's images
        as a block; the others have one entry per row. images_per_row: None means one each."""
        out = {}
        for key, value in vision.items():
            if key in self.PER_IMAGE and images_per_row is not None:
                blocks = value.split(images_per_row)  # one block per row
                out[key] = torch.cat([blk for blk in blocks for _ in range(n)])
            else:
                out[key] = value.repeat_interleave(n, dim=0)
        return out

    # ------------------------------------------------------------------ output, groups
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(self._norm(hidden)).float()

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm (what the head reads), on any (..., d) states."""
        return self._norm(hidden)

    def token_groups(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, P) group per prompt token: IMG for image tokens, SYS before the first one, INS after
        it (text between images included), PAD for left padding."""
        is_img = input_ids == self.image_token_id  # (B, P)
        after_first_img = is_img.long().cumsum(1) > 0
        groups = torch.where(after_first_img, INS, SYS)
        groups = torch.where(is_img, IMG, groups)
        return groups.masked_fill(~valid, PAD)
