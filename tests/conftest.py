import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_processor():
    from dyrate.testbed.processing import build_processor

    return build_processor(32, 8)
