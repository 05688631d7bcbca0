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


def crash_during(monkeypatch, owner, name: str, after_calls: int, run) -> None:
    """Run ``run()`` with ``owner.name`` raising "simulated crash" once it has been called
    ``after_calls`` times, expect that crash, then restore ``owner.name``."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run()
    monkeypatch.setattr(owner, name, original)


def assert_same_checkpoint(path_a, path_b) -> None:
    """Two safetensors files hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adamw_steps(kl, batches, loss_fn, steps: int, lr: float = 1e-2) -> None:
    """``steps`` AdamW steps on ``kl``'s trainable parameters with its projection hook, cycling through
    ``batches`` (``loss_fn(model, batch)``)."""
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=lr)
    kl.register_projection_hook(opt)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(kl.model, batches[step % len(batches)]).backward()
        opt.step()
