"""The controller under torch.distributed (gloo, 2 CPU processes, DDP and FSDP2): the same bases and
the same merged update as one process that sees the global batch."""
import pytest
import torch

from helpers import free_port
from test_continual import DigitsMLP, config, digits_tasks, task_loss


def one_task(rank: int, world: int, batch, ckpt=None, mode="ddp"):
    """begin_task → 5 SGD steps (through DDP, or on the FSDP2-sharded model, when world > 1) →
    end_task on this rank's shard; returns the full merged weights and bases."""
    from torch.nn.parallel import DistributedDataParallel

    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig
    from kplora_kernels.nn.linear import full

    torch.manual_seed(0)
    model = DigitsMLP()
    # rank 2: the 3-class head's task gradient has rank 2, and directions beyond a gradient's rank
    # are arbitrary (any rounding difference rotates them), so a larger rank would not compare
    placement = "cpu"
    if mode == "ddp-mmap":  # bases in a memory-mapped file per rank, streamed back layer by layer
        import os

        from kplora_kernels.continual.placement import BasisPlacement

        placement = BasisPlacement("mmap", os.path.join(os.path.dirname(ckpt), "bases"))
    kl = KeepLoRA(model, KeepLoRAConfig(**{**config("keeplora++").to_dict(), "rank": 2}), progress=False,
                  placement=placement)
    trained = model
    if world > 1 and mode == "fsdp2":  # shard after wrapping: the wrap reads whole weights
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(hasattr(p, "device_mesh") for p in kl.trainable_parameters())  # really sharded
    x, y, t = batch
    local = (x[rank::world], y[rank::world], t)
    kl.begin_task([local], task_loss)
    if world > 1 and mode.startswith("ddp"):
        trained = DistributedDataParallel(model)
    opt = torch.optim.SGD(kl.trainable_parameters(), lr=0.5)
    kl.register_projection_hook(opt)
    for _ in range(5):
        opt.zero_grad()
        task_loss(trained, local).backward()
        opt.step()
    kl.end_task([local], task_loss)
    if mode == "ddp-mmap":
        assert all(kl.placement.is_offloaded(n) for n in kl.layers) and kl.placement.max_resident_layers == 1
    if ckpt:
        kl.save(ckpt)
    from test_continual import protected

    return {name: (full(layer.weight.detach()).clone(), protected(layer).clone()) for name, layer in kl.layers.items()}


def _rank_main(rank, world, port, batch, ckpt, mode, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = one_task(rank, world, batch, ckpt, mode)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "ddp-mmap"])
def test_distributed_matches_a_single_process_on_the_global_batch(tmp_path, mode):
    import torch.multiprocessing as mp

    from kplora_kernels.continual import KeepLoRA

    train, _ = digits_tasks()[0]
    batch = (train[0][:128], train[1][:128], 0)
    single = one_task(0, 1, batch)
    torch.manual_seed(0)
    initial = {f"layers.{i}": layer.weight.detach().clone() for i, layer in enumerate(DigitsMLP().layers)}
    manager = mp.Manager()
    results = manager.dict()
    ckpt = str(tmp_path / f"{mode}.safetensors")
    mp.spawn(_rank_main, args=(2, free_port(), batch, ckpt, mode, results), nprocs=2, join=True)
    for rank in (0, 1):
        for name, (weight, V) in single.items():
            ddp_weight, ddp_V = results[rank][name]
            assert ddp_V.shape == V.shape, name
            torch.testing.assert_close(ddp_V @ ddp_V.T, V @ V.T, atol=1e-4, rtol=0)
            # the merged update agrees to fp32 summation-order noise, amplified by 5 SGD steps
            update, ddp_update = weight - initial[name], ddp_weight - initial[name]
            assert (ddp_update - update).norm() <= 1e-3 * update.norm(), name
    for name in single:  # identical on every rank, not merely close
        assert torch.equal(results[0][name][1], results[1][name][1])
        assert torch.equal(results[0][name][0], results[1][name][0])
    # written once by rank 0, loadable without a process group
    torch.manual_seed(0)
    kl = KeepLoRA.from_checkpoint(DigitsMLP(), ckpt, progress=False)
    for name, layer in kl.layers.items():
        assert torch.equal(layer.weight, results[0][name][0])


def full_mode_task(rank: int, world: int, batch):
    """adapter="full" (keeplora++, both sides protected): begin_task → 4 AdamW steps on the (FSDP2-
    sharded, when world > 1) weights → end_task; returns the full weights, their task-start values
    and the bases."""
    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig
    from kplora_kernels.nn.linear import full
    from test_continual import protected

    torch.manual_seed(0)
    model = DigitsMLP()
    # eps_w 0.9: layers 0 and 1 store V as its complement (W₀ rows kept), layer 2 as itself (thin anchor)
    cfg = KeepLoRAConfig(**{**config("keeplora++").to_dict(), "adapter": "full", "eps_w_out": 0.3,
                            "eps_w": {"default": 0.9}})
    kl = KeepLoRA(model, cfg, progress=False)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    assert [layer.V_complement for layer in kl.layers.values()] == [True, True, False]
    start = {name: full(layer.weight.detach()).clone() for name, layer in kl.layers.items()}
    bases = {name: (protected(layer).double(), layer.U.double()) for name, layer in kl.layers.items()}
    x, y, t = batch
    local = (x[rank::world], y[rank::world], t)
    kl.begin_task([local], task_loss)
    if world > 1:
        assert all(hasattr(p, "device_mesh") for p in kl.trainable_parameters())  # really sharded
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    kl.register_projection_hook(opt)
    for _ in range(4):
        opt.zero_grad()
        task_loss(model, local).backward()
        opt.step()
    trained = {name: full(layer.weight.detach()).clone() for name, layer in kl.layers.items()}
    kl.end_task([local], task_loss)
    return {name: (trained[name], start[name], *bases[name]) for name in kl.layers}


def _full_rank_main(rank, world, port, batch, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = full_mode_task(rank, world, batch)
    finally:
        dist.destroy_process_group()


def test_full_mode_under_fsdp2_matches_one_process():
    """Row-sharded weights: the V side is row-local, the U side sums UᵀG over the shards; the result
    is the single process's on the global batch, and the constraint holds on the gathered weights."""
    import torch.multiprocessing as mp

    train, _ = digits_tasks()[0]
    batch = (train[0][:128], train[1][:128], 0)
    single = full_mode_task(0, 1, batch)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_full_rank_main, args=(2, free_port(), batch, results), nprocs=2, join=True)
    for rank in (0, 1):
        for name, (W, W0, V, U) in single.items():
            W_r, W0_r, _, _ = results[rank][name]
            assert torch.equal(W0_r, W0), name
            delta, delta_r = (W - W0).double(), (W_r - W0).double()
            assert U.shape[1] > 0 and V.shape[1] > 0, name
            for d in (delta, delta_r):  # the constraint, to fp32 rounding
                assert (d @ V).abs().max() <= 1e-5 * d.abs().max(), name
                assert (U.T @ d).abs().max() <= 1e-5 * d.abs().max(), name
            # fp32 summation order differs between one process and two shards; Adam amplifies it a little
            assert (delta_r - delta).norm() <= 1e-3 * delta.norm(), name
