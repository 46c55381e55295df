"""User inputs -> what a model family's processor takes -> tensors on the model's device.

Every caller (generation, findk, lmms, training) goes through `encode`, so prompts are built,
batches padded and tensors moved one way everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's; other families name theirs (`placeholder`)


def placeholder(processor) -> str:
    """The text that stands for one image in a verbatim prompt: the processor's image token
    ("<image>" for the LLaVA families, "<|image_pad|>" for Qwen2-VL)."""
    return getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER


def read_image(image) -> Image.Image:
    """A path or a PIL image -> RGB PIL image; InputError naming the problem otherwise."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise InputError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Image.DecompressionBombError:
        raise InputError(f"image {str(path)!r} is larger than PIL's decompression-bomb limit "
                         f"({Image.MAX_IMAGE_PIXELS} pixels); resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"image {str(path)!r} cannot be read ({err.__class__.__name__}: {err})") from None


def build_prompt(processor, prompt: str, template: bool | None = None, n_images: int = 1) -> str:
    """A prompt holding image placeholders is used verbatim (one placeholder per image, where the
    image goes); one without goes through the processor's chat template, which puts the n images
    first (template=True forces the template, False forces verbatim)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("empty prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (e.g. a Latin-1 shell argument)
        raise InputError("prompt is not valid UTF-8 text") from None
    mark = placeholder(processor)
    n = prompt.count(mark)
    images = f"{n_images} image{'s' if n_images != 1 else ''}"
    if template is False or (template is None and n > 0):
        if n != n_images:
            raise InputError(f"prompt has {n} image placeholders {mark!r} but {images} {'was' if n_images == 1 else 'were'} "
                             f"given: a verbatim prompt needs one placeholder per image")
        return prompt
    if n:
        raise InputError(f"with the chat template, leave the image placeholder {mark!r} out of the prompt")
    if not getattr(processor, "chat_template", None):
        raise InputError(f"prompt has no image placeholder {mark!r} and the processor has no chat template")
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def row_images(entry) -> list:
    """One row's images: a single image (path or PIL) or a non-empty list of them."""
    if isinstance(entry, (list, tuple)):
        if not entry:
            raise InputError("a row has an empty list of images (give at least one)")
        return list(entry)
    return [entry]


@dataclass
class Encoded:
    """A processed batch on the model's device. input_ids, attention_mask: (B, P), left padded;
    vision: the processor's other outputs (LLaVA: pixel_values (N, 3, H, W) for the batch's N
    images in row order; LLaVA-NeXT: plus image_sizes; Qwen2-VL: flattened patches,
    image_grid_thw, mm_token_type_ids), as the model's forward takes them; images_per_row: (B,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vision: dict[str, torch.Tensor]
    images_per_row: list[int]

    @property
    def n_prompt(self) -> int:
        """The longest prompt of the batch in tokens (image tokens included)."""
        return int(self.attention_mask.sum(1).max())


def encode(processor, images: Sequence, prompts: Sequence[str], device, template: bool | None = None,
           texts: Sequence[str] | None = None) -> Encoded:
    """Read the images (per row: one image or a list, `row_images`), build the prompts
    (`build_prompt`) and run the processor, left padded, onto `device`. `texts`: prompts already
    built (verbatim, the image placeholders included)."""
    rows = [[read_image(img) for img in row_images(entry)] for entry in images]
    if texts is None:
        texts = [build_prompt(processor, p, template, len(row)) for p, row in zip(prompts, rows)]
    flat = [img for row in rows for img in row]
    nested = rows if any(len(row) > 1 for row in rows) else flat
    batch = processor(images=nested, text=list(texts), return_tensors="pt", padding=True, padding_side="left")
    vision = {k: v.to(device) for k, v in batch.items() if k not in ("input_ids", "attention_mask") and torch.is_tensor(v)}
    return Encoded(batch["input_ids"].to(device), batch["attention_mask"].to(device), vision, [len(r) for r in rows])
