import os

import pytest
import torch

from models import build

# Ranks share two cores: one thread each keeps them from fighting over them.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny(tiny_root):
    """tiny(family) -> directory of a random HF checkpoint of that family (built once)."""
    return lambda family: build(family, tiny_root)
