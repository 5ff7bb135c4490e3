"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tests use tiny tensors, for which one thread is fastest, above all on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def few_digits():
    """40 of the bundled 8×8 digits (no download): the training set of the tiny runs in many test modules."""
    from noisecraft.data.datasets import load_dataset
    return load_dataset("digits", split="train").subset(40)
