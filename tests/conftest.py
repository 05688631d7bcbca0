"""Fixtures for tests/. The environment (TRITON_INTERPRET, HF_HUB_OFFLINE) is set in the root
conftest.py, which pytest loads first, so that bench/ shares it; helpers live in helpers.py."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
