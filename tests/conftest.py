import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tiny import save_tiny, tiny_model  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): a 4-layer random LLaVA with GQA and 16 image tokens."""
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def vanilla():
    """The same weights as `tiny`, never touched by dyrate (plain SDPA attention)."""
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def images():
    """Three different small images (noise, so every image token differs)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        arr = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(arr))
    return out


PROMPTS = ["What is it?", "Describe the picture in detail please, every part of it.", "Hi"]


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny checkpoint directory written with save_pretrained."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_processor():
    """The testbed's offline processor at 32x32 pixels, patch 8."""
    from dyrate.testbed.processing import build_processor

    return build_processor(32, 8)
