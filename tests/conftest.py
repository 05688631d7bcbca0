"""Fixtures for tests/. The environment (TRITON_INTERPRET, HF_HUB_OFFLINE) is set in the root
conftest.py, which pytest loads first, so that bench/ shares it; helpers live in helpers.py."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["torch", "cpp", "triton"])
def backend(request):
    """Each projection backend in turn; the C++ one is skipped (with the reason) when it cannot load."""
    from kplora_kernels.ops import cpp

    if request.param == "cpp" and not cpp.load(jit=True):
        pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")
    if request.param == "triton":
        pytest.importorskip("triton")
    return request.param
