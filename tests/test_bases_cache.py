"""Wrap-time principal subspaces: the cache returns what a fresh decomposition gives and is keyed by
the weight, the energy and the side; two gloo processes share the work and agree with one."""
import torch
import torch.multiprocessing as mp

from helpers import free_port, raises
from kplora_kernels.continual import bases as bases_mod
from kplora_kernels.continual.bases import principal_bases, weight_fingerprint
from kplora_kernels.subspace import principal_subspace


def weights(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(24 + 4 * i, 16 + 2 * i, generator=gen) for i in range(n)]


def counting(monkeypatch):
    calls = []
    original = bases_mod.principal_subspace

    def counted(W, eps, side):
        calls.append(tuple(W.shape))
        return original(W, eps, side)

    monkeypatch.setattr(bases_mod, "principal_subspace", counted)
    return calls


def test_fingerprint_sees_every_element_shape_and_dtype():
    W = torch.randn(8, 6)
    assert weight_fingerprint(W) == weight_fingerprint(W.clone())
    changed = W.clone()
    changed[7, 5] = torch.nextafter(changed[7, 5], torch.tensor(float("inf")))
    assert weight_fingerprint(changed) != weight_fingerprint(W)
    assert weight_fingerprint(W.reshape(6, 8)) != weight_fingerprint(W)
    assert weight_fingerprint(W.double()) != weight_fingerprint(W)
    assert weight_fingerprint(W.mT) == weight_fingerprint(W.mT.contiguous())  # values, not strides
    with raises(TypeError, "W", "torch.Tensor", "list"):
        weight_fingerprint([1.0])


def test_cache_hits_equal_fresh_decompositions_and_misses_on_any_key_change(tmp_path, monkeypatch):
    Ws = weights()
    requests = [(f"w{i}", W, 0.8, "in" if i % 2 else "out") for i, W in enumerate(Ws)]
    calls = counting(monkeypatch)
    first = principal_bases(requests, cache_dir=tmp_path, progress=False)
    assert len(calls) == len(Ws)
    for key, W, eps, side in requests:
        assert torch.equal(first[key], principal_subspace(W, eps, side))
    again = principal_bases(requests, cache_dir=tmp_path, progress=False)
    assert len(calls) == len(Ws), "a second run decomposed again"
    assert all(torch.equal(again[k], first[k]) for k in first)
    # another energy, another side, another weight: each is a miss
    Ws[0] = Ws[0] + 1e-3
    principal_bases([("a", Ws[0], 0.8, "out"), ("b", Ws[1], 0.9, "in"), ("c", Ws[2], 0.8, "in")],
                    cache_dir=tmp_path, progress=False)
    assert len(calls) == len(Ws) + 3


def test_damaged_cache_file_is_recomputed(tmp_path, monkeypatch):
    W = weights(1)[0]
    principal_bases([("w", W, 0.8, "in")], cache_dir=tmp_path, progress=False)
    (path,) = list(tmp_path.glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:20])  # truncated, as after a crash of another writer
    calls = counting(monkeypatch)
    out = principal_bases([("w", W, 0.8, "in")], cache_dir=tmp_path, progress=False)
    assert len(calls) == 1 and torch.equal(out["w"], principal_subspace(W, 0.8, "in"))
    principal_bases([("w", W, 0.8, "in")], cache_dir=tmp_path, progress=False)
    assert len(calls) == 1, "the rewritten file was not used"


def test_cache_dir_errors(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with raises(ValueError, "cache_dir", "folder", str(not_a_folder)):
        principal_bases([("w", torch.randn(4, 4), 0.8, "in")], cache_dir=not_a_folder, progress=False)
    with raises(ValueError, "eps"):
        principal_bases([("w", torch.randn(4, 4), 1.5, "in")], progress=False)


def _rank_main(rank, world, port, requests, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        calls = []
        original = bases_mod.principal_subspace
        bases_mod.principal_subspace = lambda W, eps, side: calls.append(1) or original(W, eps, side)
        results[rank] = (principal_bases(requests, progress=False), len(calls))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_share_the_work_and_agree_with_one():
    requests = [(f"w{i}", W, 0.8, "in") for i, W in enumerate(weights())]
    single = principal_bases(requests, progress=False)
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, free_port(), requests, results), nprocs=2)
    (out0, n0), (out1, n1) = results[0], results[1]
    assert (n0, n1) == (3, 2), "the weights were not split between the ranks"
    for key in single:
        assert torch.equal(out0[key], out1[key])
        # the same subspace as one process (vectors may differ in sign with another thread count)
        assert out0[key].shape == single[key].shape
        assert torch.allclose(out0[key] @ out0[key].mT, single[key] @ single[key].mT, atol=1e-5)


def test_a_given_fingerprint_is_used_as_the_cache_key(tmp_path, monkeypatch):
    W = weights(1)[0]
    principal_bases([("w", W, 0.8, "in")], cache_dir=tmp_path, progress=False)
    hashed = []
    monkeypatch.setattr(bases_mod, "weight_fingerprint", lambda t: hashed.append(1) or weight_fingerprint(t))
    calls = counting(monkeypatch)
    out = principal_bases([("w", W, 0.8, "in", weight_fingerprint(W))], cache_dir=tmp_path, progress=False)
    assert hashed == [] and calls == [], "the weight was hashed or decomposed again"
    assert torch.equal(out["w"], principal_subspace(W, 0.8, "in"))
