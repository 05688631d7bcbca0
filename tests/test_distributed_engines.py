"""What DDP and FSDP2 see of a wrapped model (2 gloo CPU processes): no basis crosses the wire, every
method trains the same tensors on every rank, whether DDP is built right after wrapping or after
``begin_task``, and the result is the single process's on the global batch."""
import pytest
import torch

from helpers import free_port
from test_methods import MLP, config, make_task, task_loss

# (method, adapter): every method the issue names, both adapter modes
CASES = [("keeplora++", "lora"), ("lora", "lora"), ("olora", "lora"), ("inflora", "lora"),
         ("keeplora++", "full"), ("lora", "full")]
ORDERS = ("after-wrap", "after-begin")
STEPS = 3


def _case(method, adapter, order, rank, world, batch, spy=None):
    """wrap → (DDP) → begin_task → 3 SGD steps on this rank's shard → end_task; returns the trained
    tensors, the merged weights, the bases and the broadcast bytes counted per forward."""
    from torch.nn.parallel import DistributedDataParallel

    from kplora_kernels.continual import KeepLoRA
    from kplora_kernels.nn.linear import full

    model = MLP(seed=0)
    kl = KeepLoRA(model, config(method, adapter, eps_w_out=0.3 if method == "keeplora++" else None),
                  progress=False)
    x, y, t = batch
    local = (x[rank::world], y[rank::world], t)
    trained = model
    if world > 1 and order == "after-wrap":
        trained = DistributedDataParallel(model)
    kl.begin_task([local], task_loss)
    if world > 1 and order == "after-begin":
        trained = DistributedDataParallel(model)
    opt = torch.optim.SGD(kl.trainable_parameters(), lr=0.5)
    kl.register_projection_hook(opt)
    per_forward = []
    for _ in range(STEPS):
        opt.zero_grad()
        if spy is not None:
            spy.clear()
        out = trained(local[0])
        if spy is not None:
            per_forward.append(sum(spy))
        loss = torch.nn.functional.cross_entropy(out[:, 3 * t:3 * t + 3], local[1]) + kl.regularization()
        loss.backward()
        opt.step()
    trained_tensors = {f"{n}.{k}": full(getattr(layer, k).detach()).clone()
                       for n, layer in kl.layers.items() for k in ("lora_A", "lora_B", "weight")}
    kl.end_task([local], task_loss)
    merged = {n: full(layer.weight.detach()).clone() for n, layer in kl.layers.items()}
    bases = {n: (layer.V.clone(), layer.U.clone()) for n, layer in kl.layers.items()}
    basis_bytes = sum(layer.V.nbytes + layer.U.nbytes for layer in kl.layers.values())
    buffer_bytes = sum(b.nbytes for b in model.buffers())
    return {"trained": trained_tensors, "merged": merged, "bases": bases, "per_forward": per_forward,
            "basis_bytes": basis_bytes, "buffer_bytes": buffer_bytes}


def _rank_main(rank, world, port, batch, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sent = []
    original = dist._broadcast_coalesced

    def spy(group, tensors, buffer_size, src):  # what DDP's buffer sync puts on the wire
        sent.append(sum(t.nbytes for t in tensors))
        return original(group, tensors, buffer_size, src)

    dist._broadcast_coalesced = spy
    try:
        out = {}
        for method, adapter in CASES:
            for order in ORDERS:
                out[(method, adapter, order)] = _case(method, adapter, order, rank, world, batch, sent)
        results[rank] = out
    finally:
        dist._broadcast_coalesced = original
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    import torch.multiprocessing as mp

    x, y, _ = make_task(0, n=64)
    batch = (x, y, 0)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank_main, args=(2, free_port(), batch, results), nprocs=2, join=True)
    return batch, dict(results)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("method,adapter", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_ddp_sends_no_basis_and_every_rank_trains_the_same(two_ranks, method, adapter, order):
    batch, results = two_ranks
    r0, r1 = results[0][(method, adapter, order)], results[1][(method, adapter, order)]
    if method in ("keeplora++", "inflora"):
        assert r0["basis_bytes"] > 0  # there are bases to leak
    # DDP broadcasts the module's buffers on every forward: there are none besides the bases' absence
    assert len(r0["per_forward"]) == STEPS
    assert all(b <= r0["buffer_bytes"] for b in r0["per_forward"]), (r0["per_forward"], r0["buffer_bytes"])
    for key in r0["trained"]:  # every trained tensor identical on the two ranks, not merely close
        assert torch.equal(r0["trained"][key], r1["trained"][key]), key
    for name in r0["merged"]:
        assert torch.equal(r0["merged"][name], r1["merged"][name]), name
        assert torch.equal(r0["bases"][name][0], r1["bases"][name][0]), name
        assert torch.equal(r0["bases"][name][1], r1["bases"][name][1]), name
    # the same result as one process on the global batch, to fp32 summation-order noise
    single = _case(method, adapter, order, 0, 1, batch)
    initial = MLP(seed=0)
    for i, name in enumerate(single["merged"]):
        update = single["merged"][name] - initial.layers[i].weight.detach()
        ddp_update = r0["merged"][name] - initial.layers[i].weight.detach()
        assert update.norm() > 0, name
        assert (ddp_update - update).norm() <= 1e-3 * update.norm(), name


def test_bases_are_not_module_state():
    """Neither engine's state collection sees a basis: not a buffer or parameter of the module, still
    in its state_dict, and a state_dict round trip restores them exactly."""
    from kplora_kernels.continual import KeepLoRA

    model = MLP(seed=0)
    kl = KeepLoRA(model, config("keeplora++", eps_w_out=0.3), progress=False)
    bases = {id(t) for layer in kl.layers.values() for t in (layer.V, layer.U)}
    assert not bases & {id(t) for t in model.buffers()}
    assert not bases & {id(t) for t in model.parameters()}
    state = model.state_dict()
    assert {f"layers.{i}.{k}" for i in range(3) for k in ("V", "U")} <= set(state)
    fresh = MLP(seed=1)
    kl2 = KeepLoRA(fresh, config("keeplora++", eps_w_out=0.3), progress=False, compute_bases=False)
    fresh.load_state_dict(state)
    for name, layer in kl.layers.items():
        other = kl2.layers[name]
        assert torch.equal(other.V, layer.V) and torch.equal(other.U, layer.U), name
        assert other.V_complement == layer.V_complement


def test_fully_shard_leaves_the_bases_where_the_placement_put_them():
    """FSDP2 collects the managed parameters and buffers of each module it shards and moves them to
    its device (``_get_managed_states`` → ``_move_states_to_device``): the bases are in neither list,
    so they stay where the placement keeps them (same device, same storage) after ``fully_shard``."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_init import _get_managed_states

    from kplora_kernels.continual import KeepLoRA

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = MLP(seed=0)
        kl = KeepLoRA(model, config("keeplora++", eps_w_out=0.3), progress=False)
        bases = {id(t) for layer in kl.layers.values() for t in (layer.V, layer.U)}
        for layer in model.layers:
            params, buffers = _get_managed_states([layer])[:2]
            assert not bases & {id(t) for t in [*params, *buffers]}
        before = {n: (layer.V.device, layer.V.data_ptr(), layer.U.data_ptr()) for n, layer in kl.layers.items()}
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(hasattr(p, "device_mesh") for p in kl.trainable_parameters())
        after = {n: (layer.V.device, layer.V.data_ptr(), layer.U.data_ptr()) for n, layer in kl.layers.items()}
        assert after == before
    finally:
        dist.destroy_process_group()


def test_module_to_moves_bases_with_the_weight_but_keeps_their_dtype():
    from kplora_kernels.nn import FusedKeepLoRALinear
    from helpers import random_basis

    layer = FusedKeepLoRALinear(12, 10, rank=2)
    layer.set_bases(V=random_basis(12, 4, torch.float32), U=random_basis(10, 3, torch.float32, seed=1))
    V = layer.V.clone()
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.V.dtype == torch.float32
    assert torch.equal(layer.V, V)
    layer.to("meta")
    assert layer.V.device.type == "meta" and layer.U.device.type == "meta" and layer.V.dtype == torch.float32


def _nccl_main(rank, port, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from kplora_kernels.continual import KeepLoRA

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        model = MLP(seed=0).cuda()
        kl = KeepLoRA(model, config("keeplora++"), progress=False)  # placement "cpu": pinned host bases
        ddp = DistributedDataParallel(model)  # NCCL cannot send host tensors: the bases must not be state
        x, y, t = (v.cuda() if torch.is_tensor(v) else v for v in make_task(0))
        kl.begin_task([(x, y, t)], task_loss)
        opt = torch.optim.SGD(kl.trainable_parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x)[:, :3], y).backward()
            opt.step()
        kl.end_task([(x, y, t)], task_loss)
        results["devices"] = sorted({layer.V.device.type for layer in kl.layers.values()})
        results["pinned"] = all(layer.V.is_pinned() for layer in kl.layers.values())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
def test_ddp_builds_with_nccl_and_host_resident_bases():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_nccl_main, args=(free_port(), results), nprocs=1, join=True)
    assert results["devices"] == ["cpu"] and results["pinned"]
