"""Training samples come in through one small interface, `Sample`: an image, a prompt and (for the
`ce` objective) a reference answer. Where they come from (testbed scenes, a data folder, your own
files) is the caller's business; this package never reads datasets itself."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..adapters.inputs import encode
from ..errors import InputError


@dataclass(frozen=True)
class Sample:
    image: Any  # a path or a PIL image
    prompt: str  # as `dyrate.generate` takes it (chat template unless it holds the image placeholder)
    answer: str | None = None  # the reference answer (objective `ce`)


def greedy_responses(model, processor, samples: Sequence[Sample], max_new_tokens: int, batch: int = 8) -> list[list[int]]:
    """The unpruned model's greedy answers, from transformers' own `model.generate` (which dyrate's
    policy `none` equals token for token): token ids up to and including EOS when reached."""
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    out: list[list[int]] = []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        enc = encode(processor, [s.image for s in chunk], [s.prompt for s in chunk], device)
        with torch.inference_mode():
            ids = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                 **enc.vision, do_sample=False, num_beams=1,
                                 max_new_tokens=max_new_tokens)[:, enc.input_ids.shape[1]:]  # (B, T) new tokens
        for row in ids.tolist():
            end = next((j + 1 for j, tok in enumerate(row) if tok in eos), len(row))
            out.append(row[:end])
    return out


def reference_responses(model, processor, answers: Sequence[str]) -> list[list[int]]:
    """Reference answers as response token ids: tokenized without special tokens, plus EOS."""
    tok = getattr(processor, "tokenizer", processor)
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.generation_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise InputError("neither the tokenizer nor the model's generation config names an EOS token")
    if any(not isinstance(a, str) for a in answers):
        raise InputError("the ce objective needs a reference answer for every sample")
    return [tok(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]


def samples_digest(samples: Sequence[Sample]) -> str:
    """A short hash of the samples (image pixels or file bytes, prompt, answer): a resumed training
    run must see the same ones."""
    h = hashlib.sha256()
    for s in samples:
        if isinstance(s.image, Image.Image):
            h.update(s.image.tobytes())
        else:
            path = Path(s.image)
            h.update(path.read_bytes() if path.is_file() else str(path).encode())
        h.update(json.dumps([s.prompt, s.answer]).encode())
    return h.hexdigest()[:16]
