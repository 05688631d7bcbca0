"""`kplora llava` on a tiny random LLaVA (saved with save_pretrained, a word-level tokenizer) and
two fabricated conversation tasks with images: runs end to end on CPU and resumes exactly."""
import json
import os

import numpy as np
import pytest
import torch

from helpers import assert_same_checkpoint, crash_during, free_port
from kplora_kernels.cli import main
from kplora_kernels.commands.chat import normalize

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:", "what", "color", "shape", "is", "it",
         "red", "blue", "round", "square", "?"]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, PreTrainedTokenizerFast)

    folder = tmp_path_factory.mktemp("tiny-llava")
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(WORDS), bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=4,
                                              vision_feature_layer=-2)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def task_list(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("llava-data")
    rng = np.random.default_rng(0)
    os.makedirs(root / "images")
    tasks = []
    for name, question, answers in (("color", "what color is it ?", ["red", "blue"]),
                                    ("shape", "what shape is it ?", ["round", "square"])):
        for split, count in (("train", 6), ("test", 2)):
            samples = []
            for i in range(count):
                image = f"images/{name}_{split}_{i}.png"
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / image)
                samples.append({"id": f"{name}-{i}", "image": image, "conversations": [
                    {"from": "human", "value": f"<image> {question}"}, {"from": "gpt", "value": answers[i % 2]}]})
            (root / f"{name}_{split}.json").write_text(json.dumps(samples))
        tasks.append({"name": name, "train": f"{name}_train.json", "test": f"{name}_test.json"})
    (root / "tasks.json").write_text(json.dumps(tasks))
    return str(root / "tasks.json"), str(root)


SMALL = {"rank": 2, "batch_size": 3, "epochs": 2, "gradient_batches": 1, "subspace_batches": 1,
         "max_new_tokens": 2, "dtype": "fp32", "eps_w": 0.5, "lr": 1e-2, "gradient_accumulation": 2}


def llava_args(llava_dir, task_list, out, config):
    tasks, images = task_list
    return ["llava", "--model", llava_dir, "--data", tasks, "--image-root", images, "--config", config,
            "--output", str(out), "--device", "cpu"]


def test_llava_two_tasks_end_to_end_and_resume(llava_dir, task_list, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from kplora_kernels.commands import chat

    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    full = tmp_path / "full"
    cache = ["--bases-cache", str(tmp_path / "bases")]
    assert main(llava_args(llava_dir, task_list, full, str(config)) + cache) == 0
    assert len(list((tmp_path / "bases").glob("*.safetensors"))) == 2 * 7  # the language model's 2 layers × 7
    result = json.loads((full / "results.json").read_text())
    assert result["tasks"] == ["color", "shape"]
    assert len(result["accuracy"]) == 2 and all(0 <= a <= 1 for row in result["accuracy"] for a in row)
    checkpoint = load_file(str(full / "controller.safetensors"))
    assert any("multi_modal_projector" in k for k in checkpoint)  # trained without protection, saved
    assert sum("language_model" in k and k.endswith(".V") for k in checkpoint) == 2 * 7

    crashed = tmp_path / "crashed"
    args = llava_args(llava_dir, task_list, crashed, str(config)) + cache  # the bases read back: same results
    crash_during(monkeypatch, chat, "evaluate", 2, lambda: main(args))  # 2 = one task's evaluations
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming after task 1 (color)" in capsys.readouterr().out
    assert_same_checkpoint(full / "controller.safetensors", crashed / "controller.safetensors")
    # a finished run is not trained again; gradient checkpointing does not change results
    config.write_text(json.dumps({**SMALL, "gradient_checkpointing": False}))
    export = tmp_path / "export"
    assert main(args + ["--export", str(export)]) == 0
    assert "already complete: " in capsys.readouterr().out
    assert_exported_model_equals_the_wrapped_one(llava_dir, export, crashed / "controller.safetensors")


def assert_exported_model_equals_the_wrapped_one(llava_dir, export, checkpoint):
    """``--export`` wrote a stock save_pretrained folder whose logits equal the wrapped model's."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from kplora_kernels.continual import KeepLoRA

    stock, info = LlavaForConditionalGeneration.from_pretrained(str(export), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert AutoTokenizer.from_pretrained(str(export)).convert_tokens_to_ids("<image>") == 4
    wrapped = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    KeepLoRA.from_checkpoint(wrapped, str(checkpoint), progress=False)
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.cat([torch.full((1, 16), 4), torch.randint(5, len(WORDS), (1, 6), generator=gen)], 1),
             "pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}
    with torch.no_grad():
        expected, got = wrapped.eval()(**batch).logits, stock.eval()(**batch).logits
    # the wrapped model adds c·B·(A x) (B = 0 after the last task: the same weights), the stock one
    # uses the merged weights: equal to fp32 rounding
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_llava_user_errors(llava_dir, task_list, tmp_path, capsys):
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    args = llava_args(llava_dir, task_list, tmp_path / "o", str(config))
    args[args.index("--data") + 1] = str(tmp_path / "missing.json")
    assert main(args) == 2 and "task list not found" in capsys.readouterr().err
    args = llava_args(str(tmp_path / "no-model"), task_list, tmp_path / "o", str(config))
    assert main(args) == 2 and "model folder not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    for wrong, fragment in (({"dtype": "int8"}, "dtype must be one of 'bf16', 'fp16', 'fp32', got 'int8'"),
                            ({"epochs": 0}, "epochs must be an integer ≥ 1, got 0"),
                            ({"rank": "2"}, "rank must be an integer ≥ 1, got '2'"),
                            ({"lr_schedule": "step"}, "lr_schedule must be one of"),
                            ({"gradient_checkpointing": "no"}, "gradient_checkpointing must be true or false")):
        bad.write_text(json.dumps({**SMALL, **wrong}))
        # the settings are checked first: the missing model folder is not reached
        assert main(llava_args(str(tmp_path / "no-model"), task_list, tmp_path / "o", str(bad))) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_normalize():
    assert normalize("  Red. ") == "red" and normalize("two  words") == "two words"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_llava_under_torchrun_with_two_gloo_processes(llava_dir, task_list, tmp_path, strategy):
    """The README's torchrun command on CPU: both ranks train their shard; rank 0 writes."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    out = tmp_path / "ddp"
    tasks, images = task_list
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "kplora_kernels", "llava", "--model", llava_dir,
                           "--data", tasks, "--image-root", images, "--config", str(config), "--output", str(out),
                           "--device", "cpu", "--strategy", strategy], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("task 0 (color): final running loss") == 1  # rank 0 reports, once
    result = json.loads((out / "results.json").read_text())
    assert len(result["accuracy"]) == 2
    state = load_file(str(out / "controller.safetensors"))
    assert sum(k.endswith(".V") for k in state) == 2 * 7
