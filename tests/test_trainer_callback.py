"""KeepLoRACallback: one KeepLoRA task per ``transformers.Trainer.train()`` on a tiny random LLaMA
(CPU, a few steps), two tasks through one Trainer, the old-input invariance after them, the state
beside the Trainer's checkpoints, and the same under torchrun with two gloo processes (DDP)."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import free_port, raises

transformers = pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=40,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def task_data(task: int, n: int = 16, length: int = 8):
    """Token sequences of task ``task``: a counting pattern over its own part of the vocabulary."""
    gen = torch.Generator().manual_seed(task)
    low = 4 + 16 * task
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 16, (1,), generator=gen))
        ids = low + (start + torch.arange(length)) % 16
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone()})
    return rows


def wrap(model, method="keeplora++", adapter="lora"):
    from kplora_kernels.continual import KeepLoRA, KeepLoRAConfig

    cfg = KeepLoRAConfig(method=method, adapter=adapter, rank=4, alpha=4.0, eps_w={"default": 0.5}, eps_f=0.95,
                         targets=[r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"])
    return KeepLoRA(model, cfg, progress=False)


# every method whose trainable set differs from keeplora++'s LoRA mode: A trained (lora, olora), or the
# target weights themselves (adapter="full")
OTHER_CASES = [("lora", "lora"), ("olora", "lora"), ("keeplora++", "full"), ("lora", "full")]


def training_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=2e-2,
                report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, seed=0, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def protected(layer):
    from kplora_kernels.subspace.sketch import complement_basis

    return complement_basis(layer.V.float()) if layer.V_complement else layer.V.float()


def test_two_tasks_through_one_trainer(tmp_path):
    from transformers import Trainer

    from kplora_kernels.continual import KeepLoRA
    from kplora_kernels.continual.trainer import STATE_FILE, KeepLoRACallback

    kl = wrap(tiny_llama())
    trainer = Trainer(model=kl.model, args=training_args(tmp_path), train_dataset=task_data(0),
                      callbacks=[KeepLoRACallback(kl)])
    for task in range(2):
        bases = {n: protected(layer) for n, layer in kl.layers.items()}
        weights = {n: layer.weight.detach().clone() for n, layer in kl.layers.items()}
        trainer.train_dataset = task_data(task)
        trainer.train()
        assert kl.task_index == task + 1
        grown = 0
        for name, layer in kl.layers.items():
            delta = layer.weight.detach() - weights[name]
            assert delta.abs().max() > 0, f"{name}: task {task} changed nothing"
            # old-input invariance: what was protected before the task is untouched by its update
            assert (delta @ bases[name]).abs().max() <= 1e-5 * max(1.0, delta.abs().max().item()), name
            grown += layer.k_in > bases[name].shape[1]
        assert grown > 0, "end_task did not expand any basis"
        # the state beside the Trainer's output loads into a fresh model and equals this one
        fresh = KeepLoRA.from_checkpoint(tiny_llama(), str(tmp_path / STATE_FILE), progress=False)
        for name, layer in kl.layers.items():
            assert torch.equal(fresh.layers[name].weight, layer.weight)
            assert torch.equal(fresh.layers[name].V, layer.V)


@pytest.mark.parametrize("method,adapter", OTHER_CASES, ids=[f"{m}-{a}" for m, a in OTHER_CASES])
def test_every_method_and_adapter_mode_through_the_trainer(tmp_path, method, adapter):
    """The Trainer builds its optimizer before on_train_begin: it must already hold what each task
    trains (lora's A, full mode's weights); two tasks, each changes the weights, the state reloads."""
    from transformers import Trainer

    from kplora_kernels.continual import KeepLoRA
    from kplora_kernels.continual.trainer import STATE_FILE, KeepLoRACallback

    kl = wrap(tiny_llama(), method, adapter)
    trainer = Trainer(model=kl.model, args=training_args(tmp_path), train_dataset=task_data(0),
                      callbacks=[KeepLoRACallback(kl)])
    for task in range(2):
        weights = {n: layer.weight.detach().clone() for n, layer in kl.layers.items()}
        bases = {n: protected(layer) for n, layer in kl.layers.items()}
        trainer.train_dataset = task_data(task)
        trainer.train()
        assert kl.task_index == task + 1
        for name, layer in kl.layers.items():
            delta = layer.weight.detach() - weights[name]
            assert delta.abs().max() > 0, f"{name}: task {task} changed nothing"
            if method == "keeplora++":  # full mode keeps the protected inputs' outputs too
                assert (delta @ bases[name]).abs().max() <= 1e-5 * max(1.0, delta.abs().max().item()), name
        fresh = KeepLoRA.from_checkpoint(tiny_llama(), str(tmp_path / STATE_FILE), progress=False)
        for name, layer in kl.layers.items():
            assert torch.equal(fresh.layers[name].weight, layer.weight), name


def test_state_is_saved_beside_trainer_checkpoints(tmp_path):
    from transformers import Trainer

    from kplora_kernels.continual.trainer import STATE_FILE, KeepLoRACallback

    kl = wrap(tiny_llama())
    callback = KeepLoRACallback(kl)
    trainer = Trainer(model=kl.model, args=training_args(tmp_path, save_strategy="steps", save_steps=2,
                                                         save_only_model=True),
                      train_dataset=task_data(0), callbacks=[callback])
    callback.on_save(trainer.args, trainer.state, trainer.control)  # what Trainer calls after each checkpoint
    assert os.path.isfile(tmp_path / f"checkpoint-{trainer.state.global_step}" / STATE_FILE)


def test_callback_errors():
    from kplora_kernels.continual.trainer import KeepLoRACallback

    kl = wrap(tiny_llama())
    with raises(TypeError, "keeplora", "KeepLoRA controller", "LlamaForCausalLM"):
        KeepLoRACallback(kl.model)
    with raises(ValueError, "fraction", "(0, 1]", "1.5"):
        KeepLoRACallback(kl, fraction=1.5)
    with raises(TypeError, "loss_fn", "callable"):
        KeepLoRACallback(kl, loss_fn="loss")
    callback = KeepLoRACallback(kl)
    with raises(ValueError, "model", "wrap the model with KeepLoRA first"):
        callback.on_train_begin(None, None, None, model=tiny_llama(), optimizer=None, train_dataloader=[])


DDP_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, {here!r})
from test_trainer_callback import tiny_llama, task_data, wrap, training_args, protected
from transformers import Trainer
from kplora_kernels.continual.trainer import KeepLoRACallback

rank = int(os.environ["RANK"])
for case in sys.argv[2:]:
    method, adapter = case.split(":")
    out = os.path.join(sys.argv[1], method + "-" + adapter)
    kl = wrap(tiny_llama(), method, adapter)
    trainer = Trainer(model=kl.model, args=training_args(out, ddp_backend="gloo"),
                      train_dataset=task_data(0), callbacks=[KeepLoRACallback(kl)])
    for task in range(2):
        trainer.train_dataset = task_data(task)
        trainer.train()
    assert torch.distributed.is_initialized() and trainer.args.world_size == 2, "not a 2-process run"
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
    torch.save({{n: (l.weight.detach().clone(), protected(l), l.lora_A.detach().clone())
                for n, l in kl.layers.items()}}, os.path.join(out, f"rank{{rank}}.pt"))
"""

DDP_CASES = ["keeplora++:lora", "lora:lora", "olora:lora", "keeplora++:full"]


def test_two_tasks_under_torchrun_ddp_with_two_gloo_processes(tmp_path):
    script = tmp_path / "ddp_trainer.py"
    script.write_text(DDP_SCRIPT.format(here=HERE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(script), str(tmp_path), *DDP_CASES],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for case in DDP_CASES:
        out = tmp_path / case.replace(":", "-")
        states = [torch.load(out / f"rank{r}.pt") for r in range(2)]
        assert states[0].keys() == states[1].keys()
        for name in states[0]:  # every rank holds the same merged weights, bases and A
            for i, what in enumerate(("weight", "V", "lora_A")):
                assert torch.equal(states[0][name][i], states[1][name][i]), (case, name, what)
        assert os.path.isfile(out / "keeplora.safetensors"), case
