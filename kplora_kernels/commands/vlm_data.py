"""The media and conversations of ``kplora vlm``: videos decoded with PyAV (or frame folders) and
sampled evenly, and LLaVA-style conversations rendered by the model's processor (its chat template,
tokenizer, image and video processors) with labels on the answers only.

A sample has ``"image": PATH`` or ``"video": PATH`` (an MP4/WebM/… file or a folder of frames), paths
relative to the media root; the first human turn may mark the media's place with ``<image>``/``<video>``
(else the media comes first). Labels cover only the answers and the end-of-turn token; an
end-of-sequence token is appended where the template writes none.
"""
from __future__ import annotations

import bisect
import os
import re

import torch

from ..config_file import ConfigError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _frame_indices(total: int, frames: int, fps: float | None, rate: float | None) -> list[int]:
    """``frames`` indices spread evenly over ``total`` frames (with ``fps`` and a known ``rate``: one
    every ``rate/fps`` frames, at most ``frames``)."""
    count = frames
    if fps is not None and rate:
        count = max(1, min(frames, round(total / rate * fps)))
    count = min(count, total)
    if count == 1:
        return [total // 2]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def read_video(path: str, frames: int, fps: float | None = None):
    """Decode the video file or frame folder at ``path``: ``(array (T, H, W, 3) uint8, metadata dict)``
    with ``T ≤ frames`` frames sampled evenly (see :func:`_frame_indices`). Raises ``ConfigError``
    when the path is missing, holds no frame, or PyAV (package ``av``) is not installed."""
    import numpy as np

    if os.path.isdir(path):
        from PIL import Image

        files = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS))
        if not files:
            raise ConfigError(f"video frame folder {path} holds no image ({', '.join(FRAME_EXTENSIONS)})")
        indices = _frame_indices(len(files), frames, None, None)
        video = np.stack([np.asarray(Image.open(os.path.join(path, files[i])).convert("RGB")) for i in indices])
        return video, {"total_num_frames": len(files), "frames_indices": indices}
    if not os.path.isfile(path):
        raise ConfigError(f"video not found: {path}")
    try:
        import av
    except ImportError:
        raise ConfigError("kplora vlm needs PyAV to decode videos: pip install av "
                          "(or pip install 'kplora_kernels[hf]')") from None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as exc:
        raise ConfigError(f"cannot decode the video {path}: {exc}") from None
    if not decoded:
        raise ConfigError(f"the video {path} holds no frame")
    indices = _frame_indices(len(decoded), frames, fps, rate)
    meta = {"total_num_frames": len(decoded), "fps": rate, "frames_indices": indices,
            "duration": len(decoded) / rate if rate else None}
    return np.stack([decoded[i] for i in indices]), meta


class ChatData:
    """Encodes LLaVA-style conversations through ``processor`` (its chat template, tokenizer, image and
    video processors). ``frames``/``fps``: video sampling (:func:`read_video`)."""

    def __init__(self, processor, media_root: str, frames: int, fps: float | None):
        self.processor, self.media_root, self.frames, self.fps = processor, media_root, frames, fps
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None or not getattr(processor, "chat_template", None):
            raise ConfigError("the model folder's processor has no chat template (chat_template.jinja or "
                              "processor_config.json's chat_template): kplora vlm renders every sample with it")
        self.eos = self.tokenizer.eos_token

    def _media(self, sample: dict) -> tuple[str, str]:
        kinds = [k for k in ("image", "video") if k in sample]
        if len(kinds) != 1 or not isinstance(sample[kinds[0]], str):
            raise ConfigError(f"sample {sample.get('id', '?')!r} must have exactly one of \"image\": PATH or "
                              f"\"video\": PATH, got keys {sorted(sample)}")
        return kinds[0], os.path.join(self.media_root, sample[kinds[0]])

    def messages(self, sample: dict) -> list[dict]:
        """Chat messages with content items; the media item at its ``<image>``/``<video>`` marker of
        the first human turn (first when unmarked)."""
        kind, _ = self._media(sample)
        turns = sample.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            raise ConfigError(f"sample {sample.get('id', '?')!r} needs \"conversations\": [human, gpt, …]")
        out = []
        for i, turn in enumerate(turns):
            text = str(turn.get("value", ""))
            role = "user" if i % 2 == 0 else "assistant"
            if i == 0:
                parts = re.split(r"<(?:image|video)>", text)
                if len(parts) > 2:
                    raise ConfigError(f"sample {sample.get('id', '?')!r}: one <image>/<video> marker per "
                                      f"conversation, got {len(parts) - 1}")
                before, after = (parts if len(parts) == 2 else ("", parts[0]))
                content = [{"type": "text", "text": t.strip()} for t in (before,) if t.strip()]
                content += [{"type": kind}] + [{"type": "text", "text": after.strip()}]
            else:
                if re.search(r"<(?:image|video)>", text):
                    raise ConfigError(f"sample {sample.get('id', '?')!r}: the media marker must be in the first "
                                      "human turn")
                content = [{"type": "text", "text": text.strip()}]
            out.append({"role": role, "content": content})
        return out

    def _render(self, messages, prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def text(self, sample: dict) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its answers (each answer with its
        end-of-turn marker; the tokenizer's EOS appended where the template writes none)."""
        msgs = self.messages(sample)
        full = self._render(msgs, False)
        spans = []
        for i in range(1, len(msgs), 2):
            start, end = len(self._render(msgs[:i], True)), len(self._render(msgs[:i + 1], False))
            if not full.startswith(self._render(msgs[:i + 1], False)) or start > end:
                raise ConfigError("the chat template does not render a conversation as the prefix of its "
                                  "continuation; kplora vlm cannot tell the answers apart from the prompt")
            spans.append((start, end))
        if self.eos:
            for k in range(len(spans) - 1, -1, -1):  # last first: earlier offsets stay valid
                start, end = spans[k]
                if self.eos not in full[start:end]:
                    full = full[:end] + self.eos + full[end:]
                    spans = spans[:k] + [(start, end + len(self.eos))] + [(s + len(self.eos), e + len(self.eos))
                                                                          for s, e in spans[k + 1:]]
        return full, spans

    def load(self, sample: dict, frames: int):
        kind, path = self._media(sample)
        if kind == "image":
            from PIL import Image

            if not os.path.isfile(path):
                raise ConfigError(f"image not found: {path}")
            return kind, Image.open(path).convert("RGB"), None
        video, meta = read_video(path, frames, self.fps)
        return kind, video, meta

    def _process(self, texts, media):
        images = [m for k, m, _ in media if k == "image"]
        videos = [m for k, m, _ in media if k == "video"]
        kwargs = {}
        if videos:
            kwargs = {"videos": videos, "do_sample_frames": False,
                      "video_metadata": [meta for k, _, meta in media if k == "video"]}
        return self.processor(text=texts, images=images or None, return_tensors="pt", padding=True,
                              add_special_tokens=False, **kwargs)

    def batch(self, samples: list[dict], frames: int | None = None) -> dict:
        """Processor outputs for ``samples`` (padded) with ``labels``: the answers' tokens, −100 elsewhere."""
        frames = frames or self.frames
        rendered = [self.text(s) for s in samples]
        out = dict(self._process([t for t, _ in rendered], [self.load(s, frames) for s in samples]))
        ids, mask = out["input_ids"], out["attention_mask"]
        labels = torch.full_like(ids, -100)
        for row, (text, spans) in enumerate(rendered):
            plain = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            positions = mask[row].nonzero().flatten()
            shift = len(positions) - len(plain.input_ids)  # the media placeholders' expansion, all before the answers
            starts = [s for s, _ in spans]
            for i, (a, _) in enumerate(plain.offset_mapping):
                k = bisect.bisect_right(starts, a) - 1
                if k >= 0 and a < spans[k][1]:
                    p = positions[i + shift]
                    if ids[row, p] != plain.input_ids[i]:
                        raise ConfigError("cannot align the answer tokens with the processor's output (media "
                                          "tokens after an answer?)")
                    labels[row, p] = ids[row, p]
        out["labels"] = labels
        return out

    def question(self, sample: dict):
        """``(processor inputs of the first question with the generation prompt, reference answer)``."""
        msgs = self.messages(sample)
        inputs = self._process([self._render(msgs[:1], True)], [self.load(sample, self.frames)])
        return dict(inputs), sample["conversations"][1]["value"]
