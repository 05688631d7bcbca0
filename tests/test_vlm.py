"""`kplora vlm` on tiny random Qwen2-VL and LLaVA-NeXT-Video checkpoints saved as a user's are (model,
processor with its image and video processors, a word-level tokenizer, the family's chat template) and
two fabricated tasks, one of images and one of MP4 videos written here with PyAV."""
import json
import os

import numpy as np
import pytest
import torch

from helpers import assert_same_checkpoint, crash_during
from kplora_kernels.cli import main

WORDS = ["<unk>", "<pad>", "what", "color", "is", "it", "red", "blue", "moving", "still", "?", "user", "assistant",
         "system", "You", "are", "a", "helpful", "assistant.", "USER:", "ASSISTANT:"]
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template (as Qwen/Qwen2-VL-2B-Instruct ships it)
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NEXT_SPECIAL = ["<s>", "</s>", "<image>", "<video>"]
# LLaVA-NeXT-Video's chat template (llava-hf/LLaVA-NeXT-Video-7B-hf; no end-of-turn token after an answer)
NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _tokenizer(special, **tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + special)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = [t for t in special if t not in tokens.values()]
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=extra, **tokens), vocab


def build_qwen2_vl(folder):
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    tokenizer, vocab = _tokenizer(QWEN_SPECIAL, eos_token="<|im_end|>")
    pixels = {"min_pixels": 16 * 16, "max_pixels": 32 * 32, "patch_size": 8, "merge_size": 2, "temporal_patch_size": 2}
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels),
                     tokenizer=tokenizer, chat_template=QWEN_TEMPLATE).save_pretrained(folder)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=len(vocab), rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, bos_token_id=None,
                eos_token_id=vocab["<|im_end|>"], pad_token_id=1)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=vocab["<|image_pad|>"],
                           video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
                           vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = vocab["<|im_end|>"], 1
    model.save_pretrained(folder)


def build_llava_next_video(folder):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextImageProcessor, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor,
                              LlavaNextVideoVideoProcessor)

    tokenizer, vocab = _tokenizer(NEXT_SPECIAL, bos_token="<s>", eos_token="</s>")
    pinpoints = [[16, 32], [32, 16]]
    LlavaNextVideoProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                image_grid_pinpoints=pinpoints),
        video_processor=LlavaNextVideoVideoProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer, chat_template=NEXT_TEMPLATE, patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1).save_pretrained(folder)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(vocab), bos_token_id=vocab["<s>"],
                       eos_token_id=vocab["</s>"], pad_token_id=1)
    config = LlavaNextVideoConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                                  video_token_index=vocab["<video>"], image_grid_pinpoints=pinpoints,
                                  vision_feature_layer=-2, image_seq_length=16, video_seq_length=4)
    torch.manual_seed(0)
    model = LlavaNextVideoForConditionalGeneration(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = vocab["</s>"], 1
    model.save_pretrained(folder)


BUILDERS = {"qwen2_vl": build_qwen2_vl, "llava_next_video": build_llava_next_video}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](str(folder))
    return str(folder)


def write_video(path, frames, size=32, fps=8):
    """An MP4 (MPEG-4 Part 2) of ``frames`` (list of (size, size, 3) uint8 arrays), written with PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def task_list(tmp_path_factory):
    """Task "color" (images: red or blue) then task "motion" (MP4 videos: moving or still)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vlm-data")
    rng = np.random.default_rng(0)
    os.makedirs(root / "media")
    tasks = []
    for name in ("color", "motion"):
        for split, count in (("train", 4), ("test", 2)):
            samples = []
            for i in range(count):
                answer = (["red", "blue"] if name == "color" else ["moving", "still"])[i % 2]
                if name == "color":
                    path = f"media/{name}_{split}_{i}.png"
                    pixels = np.zeros((40, 40, 3), np.uint8)
                    pixels[..., 0 if answer == "red" else 2] = 200
                    Image.fromarray(pixels + rng.integers(0, 40, (40, 40, 3), dtype=np.uint8)).save(root / path)
                    sample = {"image": path, "question": "<image>\nwhat color is it ?"}
                else:
                    path = f"media/{name}_{split}_{i}.mp4"
                    frames = [np.roll(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3)),
                                      4 * f if answer == "moving" else 0, axis=1) for f in range(12)]
                    write_video(root / path, frames)
                    sample = {"video": path, "question": "<video>\nwhat is it ?"}
                question = sample.pop("question")
                samples.append({"id": f"{name}-{split}-{i}", **sample, "conversations": [
                    {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
            (root / f"{name}_{split}.json").write_text(json.dumps(samples))
        tasks.append({"name": name, "train": f"{name}_train.json", "test": f"{name}_test.json"})
    (root / "tasks.json").write_text(json.dumps(tasks))
    return str(root / "tasks.json"), str(root)


SMALL = {"rank": 2, "batch_size": 2, "epochs": 1, "gradient_batches": 1, "subspace_batches": 1, "max_new_tokens": 2,
         "dtype": "fp32", "eps_w": 0.5, "lr": 1e-2, "video_frames": 4, "boundary_video_frames": 2,
         "gradient_checkpointing": False}


def vlm_args(model, task_list, out, config):
    tasks, media = task_list
    return ["vlm", "--model", model, "--data", tasks, "--media-root", media, "--config", str(config),
            "--output", str(out), "--device", "cpu"]


def test_image_then_video_sequence_resume_and_export(vlm_dir, task_list, tmp_path, monkeypatch, capsys):
    """Two tasks (images, then MP4 videos): the 2×2 matrix, the adapters on the language model's 2 × 7
    linears only, the projector trained plainly; a crash after the first task resumes to the same
    controller state; --export reloads with AutoModelForImageTextToText alone, with the same logits."""
    from safetensors.torch import load_file

    from kplora_kernels.commands import chat

    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    full = tmp_path / "full"
    assert main(vlm_args(vlm_dir, task_list, full, config)) == 0
    result = json.loads((full / "results.json").read_text())
    assert result["tasks"] == ["color", "motion"]
    assert len(result["accuracy"]) == 2 and all(len(r) == 2 and all(0 <= a <= 1 for a in r) for r in result["accuracy"])
    assert {"last", "average", "bwt"} <= set(result)
    checkpoint = load_file(str(full / "controller.safetensors"))
    bases = [k for k in checkpoint if k.endswith(".V")]
    assert len(bases) == 2 * 7 and all(".language_model.layers." in k for k in bases), bases
    assert any("multi_modal_projector" in k or "merger" in k for k in checkpoint)  # trained plainly, saved

    crashed = tmp_path / "crashed"
    args = vlm_args(vlm_dir, task_list, crashed, config)
    crash_during(monkeypatch, chat, "evaluate", 2, lambda: main(args))  # 2 = one task's evaluations
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming after task 1 (color)" in capsys.readouterr().out
    assert_same_checkpoint(full / "controller.safetensors", crashed / "controller.safetensors")
    assert json.loads((crashed / "results.json").read_text())["accuracy"] == result["accuracy"]

    export = tmp_path / "export"
    assert main(args + ["--export", str(export)]) == 0
    assert "already complete: " in capsys.readouterr().out
    assert_export_equals_wrapped(vlm_dir, export, crashed / "controller.safetensors", task_list)


def assert_export_equals_wrapped(model_dir, export, checkpoint, task_list):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kplora_kernels.continual import KeepLoRA
    from kplora_kernels.commands.vlm_data import ChatData

    stock, info = AutoModelForImageTextToText.from_pretrained(str(export), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    wrapped = AutoModelForImageTextToText.from_pretrained(model_dir)
    KeepLoRA.from_checkpoint(wrapped, str(checkpoint), progress=False)
    tasks, media = task_list
    data = ChatData(AutoProcessor.from_pretrained(str(export)), media, frames=4, fps=None)
    samples = [json.loads(open(os.path.join(media, f"{n}_test.json")).read())[0] for n in ("color", "motion")]
    batch = data.batch(samples)
    batch.pop("labels")
    with torch.no_grad():
        expected, got = wrapped.eval()(**batch).logits, stock.eval()(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_labels_are_the_answers_and_frames_follow_the_settings(vlm_dir, task_list):
    """Each family's processor output: labels are exactly the answer and its end token (an EOS added
    where the template writes none), every other position −100; videos carry --video-frames frames,
    and the boundary passes' --boundary-video-frames."""
    from transformers import AutoProcessor

    from kplora_kernels.commands.vlm_data import ChatData

    tasks, media = task_list
    processor = AutoProcessor.from_pretrained(vlm_dir)
    data = ChatData(processor, media, frames=4, fps=None)
    samples = [json.loads(open(os.path.join(media, f"{n}_train.json")).read())[i] for n in ("color", "motion")
               for i in (0, 1)]
    batch = data.batch(samples)
    tokenizer = processor.tokenizer
    for row, sample in enumerate(samples):
        answer = sample["conversations"][1]["value"]
        kept = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert kept == tokenizer.convert_tokens_to_ids([answer, tokenizer.eos_token]), (row, kept)
    videos = processor.video_processor
    frames = {f: data.batch(samples[2:3], f)["pixel_values_videos"] for f in (4, 2)}
    if "video_grid_thw" in data.batch(samples[2:3], 2):  # Qwen: temporal patches of 2 frames
        assert [data.batch(samples[2:3], f)["video_grid_thw"][0, 0].item() for f in (4, 2)] == [2, 1]
    else:
        assert [frames[f].shape[1] for f in (4, 2)] == [4, 2], type(videos).__name__


def test_video_frame_sampling(tmp_path):
    from kplora_kernels.commands.vlm_data import read_video

    frames = [np.full((32, 32, 3), 20 * f, np.uint8) for f in range(10)]
    write_video(tmp_path / "v.mp4", frames, fps=5)
    video, meta = read_video(str(tmp_path / "v.mp4"), frames=4)
    assert video.shape == (4, 32, 32, 3) and meta["frames_indices"] == [0, 3, 6, 9] and meta["total_num_frames"] == 10
    brightness = video.reshape(4, -1).mean(1)
    assert np.allclose(brightness, [0, 60, 120, 180], atol=6)  # the frames picked, lossy codec aside
    video, meta = read_video(str(tmp_path / "v.mp4"), frames=8, fps=1.0)  # 2 s at 1 frame/s
    assert video.shape[0] == 2
    folder = tmp_path / "frames"
    folder.mkdir()
    from PIL import Image

    for f in range(5):
        Image.fromarray(frames[f]).save(folder / f"{f:03d}.png")
    video, meta = read_video(str(folder), frames=3)
    assert video.shape[0] == 3 and meta["frames_indices"] == [0, 2, 4]


def test_llava_command_runs_other_families_as_vlm(vlm_dir, task_list, tmp_path, capsys):
    """`kplora llava --image-root` on a Qwen2-VL / LLaVA-NeXT-Video folder (the issue's raw
    AttributeError before) runs as `kplora vlm` with the LLaVA defaults."""
    tasks, media = task_list
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"name": "color", "train": os.path.join(media, "color_train.json"),
                                "test": os.path.join(media, "color_test.json")}]))
    config = tmp_path / "small.json"
    config.write_text(json.dumps({k: v for k, v in SMALL.items() if "video" not in k}))
    out = tmp_path / "out"
    assert main(["llava", "--model", vlm_dir, "--data", str(one), "--image-root", media, "--config", str(config),
                 "--output", str(out), "--device", "cpu"]) == 0
    assert "running it as kplora vlm" in capsys.readouterr().out
    assert len(json.loads((out / "results.json").read_text())["accuracy"]) == 1


def test_targets_discovered_per_family(vlm_dir):
    """Language-model blocks adapted (all 7 linears × 2 layers), the vision tower only with
    train_vision, the projector (LLaVA's multi_modal_projector, Qwen's merger) found for plain training."""
    from transformers import AutoModelForImageTextToText

    from kplora_kernels.commands.targets import discover_targets

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    found = discover_targets(model)
    assert found["language"] == "model.language_model.layers" and len(found["layer_index"]) == 14
    assert sorted(set(found["layer_index"].values())) == [0, 1]
    assert found["projector"] in (["model.multi_modal_projector"], ["model.visual.merger"])
    both = discover_targets(model, train_vision=True)
    vision = [n for n in both["layer_index"] if n.startswith(found["vision"] + ".")]
    assert vision and len(both["layer_index"]) == 14 + len(vision)
    assert not any(n.startswith(p + ".") for n in vision for p in found["projector"])  # the projector trains plainly


def test_user_errors_are_clear(tmp_path, monkeypatch):
    from torch import nn

    from kplora_kernels.config_file import ConfigError
    from kplora_kernels.commands.targets import discover_targets
    from kplora_kernels.commands.vlm_data import ChatData, read_video

    class VisionOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ConfigError, match="cannot find the language model's decoder layers in VisionOnly: searched "
                                          "submodules named language_model, text_model"):
        discover_targets(VisionOnly())
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # PyAV not installed
    (tmp_path / "v.mp4").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"needs PyAV to decode videos: pip install av"):
        read_video(str(tmp_path / "v.mp4"), 4)
    with pytest.raises(ConfigError, match="video not found"):
        read_video(str(tmp_path / "missing.mp4"), 4)

    class Tokenizer:
        eos_token = "</s>"

    class Processor:
        tokenizer, chat_template = Tokenizer(), "{{ messages }}"

    data = ChatData(Processor(), str(tmp_path), 4, None)
    with pytest.raises(ConfigError, match=r"exactly one of \"image\": PATH or \"video\": PATH, got keys"):
        data.messages({"id": "x", "conversations": []})
    with pytest.raises(ConfigError, match="the media marker must be in the first human turn"):
        data.messages({"image": "a.png", "conversations": [{"value": "q"}, {"value": "<image> a"}]})
    Processor.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        ChatData(Processor(), str(tmp_path), 4, None)


def test_vlm_under_torchrun_ddp_with_two_gloo_processes(tmp_path, task_list):
    """torchrun with 2 gloo processes on a tiny Qwen2-VL, images then videos: both ranks train their
    shard through DDP, rank 0 alone reports and writes; the checkpoint holds the language model's bases."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from helpers import free_port

    model = tmp_path / "qwen2_vl"
    build_qwen2_vl(str(model))
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "kplora_kernels",
                           *vlm_args(str(model), task_list, out, config), "--strategy", "ddp"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("task 0 (color): final running loss") == 1  # rank 0 reports, once
    result = json.loads((out / "results.json").read_text())
    assert result["tasks"] == ["color", "motion"] and len(result["accuracy"]) == 2
    state = load_file(str(out / "controller.safetensors"))
    assert sum(k.endswith(".V") for k in state) == 2 * 7
