"""Bases off the training device between task boundaries: the mmap placement on CPU (observable in
the process's memory maps), training steps that never touch them, boundaries that bring them back,
results bit-identical to resident bases, layers that need their bases in training left resident."""
import pytest
import torch

from helpers import random_basis, raises
from kplora_kernels.continual.placement import BasisPlacement
from kplora_kernels.nn import FusedKeepLoRALinear


def layer_with_bases(train_A=False, U=False, seed=0):
    torch.manual_seed(seed)
    layer = FusedKeepLoRALinear.from_linear(torch.nn.Linear(32, 24), 4, train_A=train_A)
    layer.set_bases(V=random_basis(32, 10, torch.float32, seed), U=random_basis(24, 3, torch.float32, seed) if U else None)
    return layer


def mapped_files():
    with open("/proc/self/maps") as f:
        return f.read()


def test_mmap_placement_maps_the_bases_and_a_step_never_touches_them(tmp_path):
    layer = layer_with_bases()
    V = layer.V.clone()
    placement = BasisPlacement("mmap", tmp_path)
    placement.offload({"l": layer})
    assert placement.is_offloaded("l")
    assert str(tmp_path / "rank0" / "l.safetensors") in mapped_files()
    assert torch.equal(layer.V, V)
    ptr = layer.V.data_ptr()
    opt = torch.optim.AdamW([layer.lora_B], lr=1e-2)
    layer.register_projection_hook(opt)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(6, 32)).square().sum().backward()
        opt.step()
    assert layer.V.data_ptr() == ptr, "a training step moved the bases"
    with placement.resident({"l": layer}):
        assert not placement.is_offloaded("l") and torch.equal(layer.V, V)
        assert layer.V.data_ptr() != ptr
    assert placement.is_offloaded("l") and torch.equal(layer.V, V)


def test_training_is_bit_identical_in_every_placement(tmp_path):
    outputs = []
    for mode in ("device", "cpu", "mmap"):
        layer = layer_with_bases()
        placement = BasisPlacement(mode, tmp_path / mode if mode == "mmap" else None)
        placement.offload({"l": layer})
        opt = torch.optim.AdamW([layer.lora_B], lr=1e-2)
        torch.manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            layer(torch.randn(6, 32)).square().sum().backward()
            opt.step()
        with placement.resident({"l": layer}):
            layer.absorb_()
            outputs.append((layer.weight.detach().clone(), layer.V.clone()))
    for weight, V in outputs[1:]:
        assert torch.equal(weight, outputs[0][0]) and torch.equal(V, outputs[0][1])


@pytest.mark.parametrize("kind", ["train_A", "U"])
def test_layers_that_read_bases_in_training_stay_resident(tmp_path, kind):
    layer = layer_with_bases(train_A=kind == "train_A", U=kind == "U")
    placement = BasisPlacement("mmap", tmp_path)
    placement.offload({"l": layer})
    assert not placement.is_offloaded("l")
    assert str(tmp_path) not in mapped_files()


def test_a_layer_that_starts_reading_its_bases_gets_them_back(tmp_path):
    layer = layer_with_bases()
    placement = BasisPlacement("mmap", tmp_path)
    placement.offload({"l": layer})
    assert placement.is_offloaded("l")
    mapped, V = layer.V, layer.V.clone()
    layer.lora_A.requires_grad_(True)  # a method that trains A: the backward projects dA on V
    placement.offload({"l": layer})
    assert not placement.is_offloaded("l")
    assert layer.V is not mapped and torch.equal(layer.V, V)  # a copy in memory, no longer the file's view
    layer(torch.randn(5, 32)).sum().backward()
    assert torch.allclose(layer.lora_A.grad @ layer.V, torch.zeros(4, 10), atol=1e-6)


def test_mmap_file_names_are_safe_for_any_module_name(tmp_path):
    """Module paths may hold ``/`` (a ModuleDict key) or be long: each layer still gets its own file."""
    names = ["blocks.a/b.q", "x" * 300, "x" * 300 + "y"]
    layers = {n: layer_with_bases(seed=i) for i, n in enumerate(names)}
    placement = BasisPlacement("mmap", tmp_path)
    placement.offload(layers)
    files = sorted(p.name for p in (tmp_path / "rank0").iterdir())
    assert len(files) == 3 and all(len(f) < 255 for f in files) and "blocks.a%2Fb.q.safetensors" in files
    assert all(placement.is_offloaded(n) for n in names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_placement_follows_a_model_moved_to_cuda_after_wrapping():
    layer = layer_with_bases()
    placement = BasisPlacement("cpu")
    placement.offload({"l": layer})  # a CPU model: nothing moves
    layer.cuda()  # the buffers follow the module
    for _ in placement.stream({"l": layer}):
        assert layer.V.device.type == "cuda"
    assert layer.V.device.type == "cpu" and layer.V.is_pinned()


def test_placement_errors(tmp_path):
    with raises(ValueError, "placement", "'device', 'cpu', 'mmap'", "BasisPlacement", "'disk'"):
        BasisPlacement("disk")
    with raises(ValueError, "folder", "mmap", "None"):
        BasisPlacement("mmap")
    with raises(ValueError, "folder", "mmap", "''"):
        BasisPlacement("mmap", "")
    with raises(TypeError, "folder", "os.PathLike", "int", "123"):
        BasisPlacement("mmap", 123)
    with raises(ValueError, "folder", "only the 'mmap' placement", "'cpu'"):
        BasisPlacement("cpu", tmp_path)
    (tmp_path / "afile").write_text("x")
    with raises(ValueError, "folder", "the file", "afile"):
        BasisPlacement("mmap", tmp_path / "afile")
    assert BasisPlacement().mode == "cpu"  # the same default as KeepLoRA's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_placement_keeps_bases_in_pinned_host_memory_on_cuda():
    layer = layer_with_bases().cuda()
    placement = BasisPlacement("cpu")
    placement.offload({"l": layer})
    assert layer.V.device.type == "cpu" and layer.V.is_pinned()
    layer(torch.randn(6, 32, device="cuda")).sum().backward()
    with placement.resident({"l": layer}):
        assert layer.V.device.type == "cuda"
    assert layer.V.device.type == "cpu"


def run_two_tasks(placement, steps=5):
    """Two digit tasks through the controller with ``placement``; what was observed of the bases
    during training and during the boundaries, and the final state."""
    from kplora_kernels.continual import KeepLoRA
    from test_continual import DigitsMLP, config, digits_tasks, task_loss

    torch.manual_seed(0)
    model = DigitsMLP()
    kl = KeepLoRA(model, config("keeplora++"), progress=False, placement=placement)
    seen = {"boundary": [], "training": []}

    def observe(where):
        seen[where].append({n: kl.placement.is_offloaded(n) for n in kl.layers})

    def boundary_loss(m, batch):
        observe("boundary")
        return task_loss(m, batch)

    for train, _ in digits_tasks()[:2]:
        kl.begin_task([train], boundary_loss)
        opt = torch.optim.AdamW(kl.trainable_parameters(), lr=1e-2)
        kl.register_projection_hook(opt)
        for _ in range(steps):
            observe("training")
            opt.zero_grad()
            task_loss(model, train).backward()
            opt.step()
        kl.end_task([train], boundary_loss)
    return kl, seen


def test_controller_keeps_bases_off_between_boundaries_and_is_bit_identical(tmp_path, monkeypatch):
    from kplora_kernels.continual.placement import BasisPlacement

    ref, _ = run_two_tasks("device")
    placement = BasisPlacement("mmap", tmp_path)
    handed_out = []  # at every layer a boundary works on: the layers whose bases are then in memory
    stream = BasisPlacement.stream

    def watched(self, layers):
        for name, layer in stream(self, layers):
            handed_out.append((name, {n for n in layers if not self.is_offloaded(n)}))
            yield name, layer

    monkeypatch.setattr(BasisPlacement, "stream", watched)
    kl, seen = run_two_tasks(placement)
    assert all(all(step.values()) for step in seen["training"]), "bases resident during training"
    # the data passes of begin_task and end_task never bring a basis back (the sketches hold them
    # where they live); the finalisations bring them back one layer at a time
    assert all(all(step.values()) for step in seen["boundary"]), "bases resident during a boundary's data pass"
    assert len(handed_out) == 2 * 2 * len(kl.layers)  # 2 tasks × (begin, end) × every layer
    assert all(resident == {name} for name, resident in handed_out), handed_out
    assert placement.max_resident_layers == 1 and placement.resident_layers == 0
    assert all(kl.placement.is_offloaded(n) for n in kl.layers)
    assert all(str(tmp_path / "rank0" / f"{n}.safetensors") in mapped_files() for n in kl.layers)
    for name, layer in kl.layers.items():
        assert torch.equal(layer.weight, ref.layers[name].weight), name
        assert torch.equal(layer.V, ref.layers[name].V), name
    kl.save(str(tmp_path / "a.safetensors"))
    ref.save(str(tmp_path / "b.safetensors"))
    from helpers import assert_same_checkpoint

    assert_same_checkpoint(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def test_stream_puts_each_layer_back_and_writes_only_changed_bases(tmp_path):
    layers = {f"l{i}": layer_with_bases(seed=i) for i in range(3)}
    originals = {n: layer.V.clone() for n, layer in layers.items()}
    placement = BasisPlacement("mmap", tmp_path)
    placement.offload(layers)
    mapped = {n: layer.V for n, layer in layers.items()}
    grown = random_basis(32, 12, torch.float32, 7)
    for name, layer in placement.stream(layers):
        assert not placement.is_offloaded(name) and layer.V.data_ptr() != mapped[name].data_ptr()
        assert all(placement.is_offloaded(n) for n in layers if n != name)
        if name == "l1":
            assert layers["l0"].V is mapped["l0"], "an unchanged basis was copied back instead of re-mapped"
            layer.set_bases(V=grown)  # a task end grows this one
    assert all(placement.is_offloaded(n) for n in layers)
    assert layers["l0"].V is mapped["l0"] and layers["l2"].V is mapped["l2"], "an unchanged basis was rewritten"
    assert torch.equal(layers["l1"].V, grown) and torch.equal(layers["l0"].V, originals["l0"])
    assert str(tmp_path / "rank0" / "l1.safetensors") in mapped_files()
    from kplora_kernels.continual.placement import _map_safetensors

    assert torch.equal(_map_safetensors(str(tmp_path / "rank0" / "l1.safetensors"))["V"], grown)
    assert torch.equal(_map_safetensors(str(tmp_path / "rank0" / "l2.safetensors"))["V"], originals["l2"])


def test_stream_releases_the_layer_when_the_body_raises(tmp_path):
    layers = {f"l{i}": layer_with_bases(seed=i) for i in range(2)}
    placement = BasisPlacement("mmap", tmp_path)
    placement.offload(layers)
    with pytest.raises(RuntimeError, match="boom"):
        for name, _ in placement.stream(layers):
            raise RuntimeError("boom")
    assert all(placement.is_offloaded(n) for n in layers) and placement.resident_layers == 0


def test_controller_full_mode_keeps_bases_resident(tmp_path):
    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig
    from kplora_kernels.continual.placement import BasisPlacement
    from test_continual import DigitsMLP, config

    cfg = KeepLoRAConfig(**{**config("keeplora++").to_dict(), "adapter": "full"})
    kl = KeepLoRA(DigitsMLP(), cfg, progress=False, placement=BasisPlacement("mmap", tmp_path))
    assert kl.placement.mode == "device" and not any(kl.placement.is_offloaded(n) for n in kl.layers)


def test_resume_with_mmap_placement_is_bit_identical(tmp_path):
    """Save after one task with the bases memory-mapped, resume into a fresh model with the same
    placement, run the second task: the same weights and bases as an uninterrupted resident run."""
    from kplora_kernels.continual import KeepLoRA
    from test_continual import DigitsMLP, config, digits_tasks, run_one_task, task_loss

    def task(kl, model, train):
        run_one_task(kl, [train], task_loss, steps=3)

    tasks = digits_tasks()[:2]
    torch.manual_seed(0)
    ref_model = DigitsMLP()
    ref = KeepLoRA(ref_model, config("keeplora++"), progress=False, placement="device")
    for train, _ in tasks:
        task(ref, ref_model, train)
    torch.manual_seed(0)
    model = DigitsMLP()
    kl = KeepLoRA(model, config("keeplora++"), progress=False, placement=BasisPlacement("mmap", tmp_path / "a"))
    task(kl, model, tasks[0][0])
    kl.save(str(tmp_path / "ckpt.safetensors"))
    torch.manual_seed(0)
    resumed_model = DigitsMLP()
    resumed = KeepLoRA.from_checkpoint(resumed_model, str(tmp_path / "ckpt.safetensors"), progress=False,
                                       placement=BasisPlacement("mmap", tmp_path / "b"))
    assert all(resumed.placement.is_offloaded(n) for n in resumed.layers)
    assert str(tmp_path / "b" / "rank0") in mapped_files()
    task(resumed, resumed_model, tasks[1][0])
    for name, layer in resumed.layers.items():
        assert torch.equal(layer.weight, ref.layers[name].weight), name
        assert torch.equal(layer.V, ref.layers[name].V), name
