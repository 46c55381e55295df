"""Processors without their video part.

In transformers 5.24 the Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors hold a video processor
that needs torchvision, and PyPI's torchvision does not import beside the CPU torch wheel. dyrate
feeds images only, so where torchvision is missing it builds the same processor class without the
video part: same image processor, tokenizer, chat template and token expansion, hence the same
tokens. That is the only loading failure tolerated (`load_processor`)."""

from __future__ import annotations

import sys
from functools import cache


def torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a wheel built for another torch (RuntimeError at import)
        return False
    return True


def _named_as_parent(cls: type) -> type:
    """Give an image-only subclass its parent's name: saved, it records the parent's processor
    class, so `AutoProcessor` loads the files as the parent where torchvision works."""
    parent = cls.__mro__[1]
    cls.__name__ = cls.__qualname__ = parent.__name__
    return cls


# Each keeps its parent's keyword arguments (transformers reads a processor's saved settings from
# the __init__ code's argument names) and passes the parent an empty video slot: ProcessorMixin
# pairs positional sub-processors with the subclass's two attributes and drops the third.
def _qwen_family(parent: type) -> type:
    class ImageOnly(parent):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            parent.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return _named_as_parent(ImageOnly)


def _onevision(parent: type) -> type:
    class ImageOnly(parent):
        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
            kwargs.pop("video_processor", None)
            parent.__init__(self, image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                            image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
                            **kwargs)

    return _named_as_parent(ImageOnly)


@cache
def image_only(cls: type) -> type:
    """`cls` (the Qwen2-VL, Qwen2.5-VL or LLaVA-OneVision processor) without its video processor:
    a subclass of the same name whose sub-processors are the image processor and the tokenizer."""
    from transformers import LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor

    if cls in (Qwen2VLProcessor, Qwen2_5_VLProcessor):
        return _qwen_family(cls)
    if cls is LlavaOnevisionProcessor:
        return _onevision(cls)
    raise TypeError(f"no image-only variant of {cls.__name__}")


def load_processor(path):
    """AutoProcessor for a checkpoint directory; where that fails only for want of torchvision and
    the family's processor has a video part, the same processor without it (one line on stderr)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        first = err
    cls = _processor_class(path)
    if cls is None or "video_processor" not in cls.get_attributes() or torchvision_works():
        raise first
    try:
        image_only(cls)
    except TypeError:
        raise first from None
    proc = image_only(cls).from_pretrained(path, local_files_only=True)
    print(f"dyrate: torchvision is unavailable; {cls.__name__} loaded without its video processor (images only)",
          file=sys.stderr)
    return proc


def _processor_class(path):
    """The processor class a checkpoint's processor_config.json names, or None."""
    import json
    from pathlib import Path

    import transformers

    try:
        name = json.loads((Path(path) / "processor_config.json").read_text()).get("processor_class")
    except (OSError, ValueError):
        return None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and hasattr(cls, "get_attributes") else None
