import pytest
from hypothesis import settings

# The property sweeps draw the same examples on every run, so the suite is deterministic; a case once
# found failing is kept as an @example beside its test.
settings.register_profile("deterministic", derandomize=True)
settings.load_profile("deterministic")

from diffuse.config import load_config


def tiny_config(*overrides):
    """fmnist-tiny made smaller still: seconds per run, for tests of the machinery, not of quality. Its samples
    are drawn in fp32, whose images tests compare bit for bit across batch sizes on any CPU; bf16 sampling
    has its own tests (test_speed.py)."""
    base = ["model.channels=[8, 16]", "model.emb_dim=32", "train.kimg=0.256", "train.batch=16",
            "train.log_kimg=0.064", "train.grid_kimg=0.256", "train.checkpoint_kimg=0.128", "train.fd_kimg=0", "sample.steps=4",
            "sample.precision=fp32"]
    return load_config("fmnist-tiny", overrides=[*base, *overrides])


@pytest.fixture
def tiny():
    return tiny_config
