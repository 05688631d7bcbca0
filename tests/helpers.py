"""Helpers shared by the tests (imported as ``helpers``; ``conftest`` is ambiguous with bench/)."""
import contextlib
import socket

import pytest
import torch


def random_basis(dim: int, k: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """A random ``dim×k`` orthonormal basis."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, max(k, 1), generator=gen, dtype=torch.float64))
    return Q[:, :k].to(dtype)


@contextlib.contextmanager
def raises(exc, *fragments):
    """Like ``pytest.raises(exc)``, and the message must contain every fragment."""
    with pytest.raises(exc) as info:
        yield info
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def free_port() -> int:
    """A free TCP port on the loopback interface, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
