"""kplora_kernels.distributed owns every collective: no other module calls torch.distributed's
collectives or rank arithmetic directly, and its helpers behave on a 1-process gloo group."""
import ast
import os
import pathlib
import socket

import pytest
import torch
import torch.distributed as dist

import kplora_kernels
from kplora_kernels import distributed as kd

PACKAGE = pathlib.Path(kplora_kernels.__file__).parent
CALLS = {"all_reduce", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object", "reduce_scatter",
         "barrier", "get_rank", "get_world_size", "get_global_rank", "reduce", "gather", "scatter"}

OWNER = {"distributed.py"}  # the owner itself


def _direct_calls(path):
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CALLS:
            owner = ast.unparse(node.func.value)
            if owner in ("torch.distributed", "dist"):
                found.append(f"{owner}.{node.func.attr} (line {node.lineno})")
    return found


def test_no_collective_outside_distributed():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in OWNER:
            continue
        calls = _direct_calls(path)
        if calls:
            offenders[rel] = calls
    assert not offenders, offenders


def test_distributed_imports_only_torch_at_module_level():
    tree = ast.parse((PACKAGE / "distributed.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] == "torch" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.module == "__future__" or node.module.split(".")[0] == "torch", node.module


def test_nn_linear_reexports():
    from kplora_kernels.nn import linear

    assert linear.full is kd.full and linear.assign_ is kd.assign_ and linear.add_ is kd.add_


def test_without_process_group():
    if kd.is_distributed():
        pytest.skip("a process group is up")
    t = torch.ones(3)
    assert kd.rank() == 0 and kd.world_size() == 1 and kd.is_rank0()
    assert kd.broadcast_from_rank0(t, None) is t
    kd.all_reduce_sum_([t])
    kd.barrier()
    assert torch.equal(t, torch.ones(3))
    assert kd.full(t) is t
    p = torch.zeros(2, 2)
    kd.assign_(p, torch.ones(2, 2, dtype=torch.float64))
    kd.add_(p, torch.ones(2, 2))
    assert torch.equal(p, torch.full((2, 2), 2.0))


@pytest.fixture
def gloo1():
    if dist.is_initialized():
        pytest.skip("a process group is already up")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_helpers_on_one_process_gloo(gloo1):
    assert kd.is_distributed() and kd.rank() == 0 and kd.world_size() == 1 and kd.global_rank(None, 0) == 0
    t = torch.arange(4.0)
    kd.all_reduce_sum_([t])
    assert torch.equal(t, torch.arange(4.0))
    out = kd.broadcast_from_rank0(torch.arange(6.0).reshape(2, 3), None)
    assert torch.equal(out, torch.arange(6.0).reshape(2, 3))
    Ps = [torch.ones(2, 3), torch.ones(1, 3)]
    kd.shard_sum(None)(Ps)
    assert all(torch.equal(P, torch.ones_like(P)) for P in Ps)
    kd.barrier()


def test_row_shard_projection_and_restore_match_unsharded(gloo1):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from kplora_kernels import ops

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (1,))
    out, inp = 8, 6
    U = torch.linalg.qr(torch.randn(out, 2, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(inp, 3, dtype=torch.float64))[0]
    W0 = torch.randn(out, inp, dtype=torch.float64)
    G = torch.randn(out, inp, dtype=torch.float64)
    Gd = distribute_tensor(G.clone(), mesh, [Shard(0)])
    kd.project_sharded_(Gd, U, V, False, 0.5)
    expect = 0.5 * (torch.eye(out, dtype=torch.float64) - U @ U.mT) @ G @ (torch.eye(inp, dtype=torch.float64) - V @ V.mT)
    torch.testing.assert_close(Gd.to_local(), expect)
    Wd = distribute_tensor(W0.clone(), mesh, [Shard(0)])
    snap = kd.sharded_snapshot(Wd, U, V, False)
    step = torch.randn(out, inp, dtype=torch.float64)
    Wd.to_local().add_(step)
    kd.restore_sharded_(Wd, U, V, False, snap)
    W = W0 + step
    ops.subspace_restore_(W, U, V, W0=W0)
    torch.testing.assert_close(Wd.to_local(), W)
    with pytest.raises(NotImplementedError, match="Shard"):
        from torch.distributed.tensor import Replicate

        kd.row_shard(distribute_tensor(W0, mesh, [Replicate()]))


@pytest.mark.parametrize("case", ["complement", "no_U", "float32"])
def test_row_shard_restore_variants(gloo1, case):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from kplora_kernels import ops

    torch.manual_seed(1)
    mesh = init_device_mesh("cpu", (1,))
    dt = torch.float32 if case == "float32" else torch.float64
    out, inp = 8, 6
    U = None if case == "no_U" else torch.linalg.qr(torch.randn(out, 2, dtype=dt))[0]
    V = torch.linalg.qr(torch.randn(inp, 4 if case == "complement" else 2, dtype=dt))[0]
    complement = case == "complement"
    W0 = torch.randn(out, inp, dtype=dt)
    Wd = distribute_tensor(W0.clone(), mesh, [Shard(0)])
    snap = kd.sharded_snapshot(Wd, U, V, complement)
    step = torch.randn(out, inp, dtype=dt)
    Wd.to_local().add_(step)
    kd.restore_sharded_(Wd, U, V, complement, snap)
    W = W0 + step
    ops.subspace_restore_(W, U, V, W0=W0, V_complement=complement)
    torch.testing.assert_close(Wd.to_local(), W)
