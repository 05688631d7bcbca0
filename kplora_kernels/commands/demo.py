"""``kplora demo``: a continual-learning run a newcomer can watch on a CPU in a few minutes.

A tiny open_clip model is pre-trained (stage 0) on digit names, the "pre-trained knowledge", and
cached. Then each method (keeplora++, keeplora, lora) starts from that model and learns a sequence
of tasks with their own label spaces (parity, magnitude, loops, mirrored digits or clothing),
evaluated by CLIP-style zero-shot classification on every task after every task, plus the base
domain. Results: printed tables, ``results.json``, one heatmap PNG per method.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..atomic import write_atomically
from ..continual.config import KeepLoRAConfig
from ..config_file import ConfigError, describe_settings, load_settings, require_packages, setting
from ..continual import KeepLoRA, metrics, preset, zero_shot
from ..continual.report import heatmap
from ..data.demo_tasks import FASHION_DIR, build_domains
from ..training import log as logger
from ..training import train_steps


@dataclass
class DemoConfig:
    """The demo's settings (``--config`` file keys); ``kplora demo --help`` lists them."""

    seed: int = setting(0, "seed of the data split, the models and the batches", ge=0)
    methods: list[str] = setting(default_factory=lambda: ["keeplora++", "keeplora", "inflora", "olora", "lora"],
                                 help="the methods compared, each from the same stage-0 model")
    fashion: bool = setting(False, "replace the mirrored-digits task by two Fashion-MNIST tasks "
                                   "(Debian package dataset-fashion-mnist)")
    fashion_root: str = setting(FASHION_DIR, "where the Fashion-MNIST idx files are")
    width: int = setting(64, "model width (a multiple of 32)", ge=32)
    layers: int = setting(2, "transformer blocks per tower", ge=1)
    stage0_steps: int = setting(600, "pre-training steps on digit names (stage 0)", ge=1)
    stage0_lr: float = setting(2e-3, "stage-0 learning rate", gt=0)
    task_steps: int = setting(150, "training steps per task", ge=1)
    lr: float = setting(2e-3, "learning rate of the adapters", gt=0)
    batch_size: int = setting(64, "images per batch", ge=1)
    rank: int = KeepLoRAConfig.setting("rank", 8, "adapter rank r (at most width/2)")
    alpha: float = KeepLoRAConfig.setting("alpha", 16.0)
    eps_w_visual: float = KeepLoRAConfig.setting("eps_w", 0.85, "ε_w of the image tower's principal subspaces")
    eps_w_text: float = KeepLoRAConfig.setting("eps_w", 0.2, "ε_w of the text tower's principal subspaces")
    eps_f: float = KeepLoRAConfig.setting("eps_f", 0.99)
    gradient_fraction: float = setting(0.5, "share of 10 batches used for the task-start gradient",
                                       gt=0, le=1)
    max_tasks: int | None = setting(None, "learn only the first tasks (null: all)", ge=1)

    @classmethod
    def from_file(cls, path: str | None, **overrides) -> "DemoConfig":
        return load_settings(cls, path, **overrides)

    def check(self) -> None:
        """Rules that tie keys together (types and ranges are checked by :func:`load_settings`)."""
        from ..continual.config import METHODS

        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"methods must be a non-empty list from {METHODS}, got {self.methods}")
        if self.width % 32:
            raise ConfigError(f"width must be a multiple of 32 (attention heads of 32), got {self.width}")
        if self.rank > self.width // 2:
            raise ConfigError(f"rank must be at most width/2 = {self.width // 2}, got {self.rank}")


# --- model and data ------------------------------------------------------------------------------

def build_model(cfg: DemoConfig):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(cfg.seed)
    return CLIP(embed_dim=cfg.width,
                vision_cfg=CLIPVisionCfg(layers=cfg.layers, width=cfg.width, patch_size=4, image_size=16, head_width=32),
                text_cfg=CLIPTextCfg(context_length=12, width=cfg.width, heads=cfg.width // 32, layers=cfg.layers))


def to_images(x: torch.Tensor) -> torch.Tensor:
    """``(n, 1, 8, 8)`` in [0, 1] → ``(n, 3, 16, 16)`` normalised, as the model takes them."""
    return (nn.functional.interpolate(x, scale_factor=2, mode="nearest").repeat(1, 3, 1, 1) - 0.5) / 0.5


class Task:
    """A domain with its tokenized class prompts; batches are ``(images, labels, prompts)``."""

    def __init__(self, domain, tokenizer):
        self.domain = domain
        self.prompts = tokenizer([domain.prompt.format(c) for c in domain.class_names])

    def batches(self, batch_size: int, seed: int, count: int):
        gen = torch.Generator().manual_seed(seed)
        n = len(self.domain.y_train)
        for _ in range(count):
            idx = torch.randint(0, n, (batch_size,), generator=gen)
            yield to_images(self.domain.x_train[idx]), self.domain.y_train[idx], self.prompts


def classification_loss(model, batch):
    images, labels, prompts = batch
    return zero_shot.classification_loss(model, images, labels, prompts)


@torch.no_grad()
def zero_shot_accuracy(model, task: Task) -> float:
    model.eval()
    logits = zero_shot.class_logits(model, to_images(task.domain.x_test), zero_shot.text_features(model, task.prompts))
    return logits.argmax(1).eq(task.domain.y_test).float().mean().item()


def _stage0_sources() -> list[str]:
    """The files whose code determines stage 0: this module, the training loop and the demo data."""
    from .. import training
    from ..data import demo_tasks

    return [__file__, training.__file__, demo_tasks.__file__]


def stage0_key(cfg: DemoConfig) -> str:
    """The cache key of stage 0: a hash of the settings that determine it, of the code that trains it
    (so a cache written by another version of the demo is not reused silently) and of the torch and
    open_clip versions."""
    import open_clip

    h = hashlib.sha256(json.dumps({k: getattr(cfg, k) for k in ("seed", "width", "layers", "stage0_steps",
                                                                 "stage0_lr", "batch_size")}, sort_keys=True).encode())
    h.update(f"|torch {torch.__version__}|open_clip {open_clip.__version__}|".encode())
    for source in _stage0_sources():
        with open(source, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def pretrain(cfg: DemoConfig, base: Task, cache_dir: str, log):
    """Stage 0 on the base domain, cached under :func:`stage0_key`."""
    model = build_model(cfg)
    path = os.path.join(cache_dir, f"stage0-{stage0_key(cfg)}.pt")
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, map_location="cpu"))
        log(f"stage 0: loaded the pre-trained model from {path}")
        return model
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.stage0_lr, weight_decay=0.05)
    model.train()
    result = train_steps(lambda batch: classification_loss(model, batch),
                         base.batches(cfg.batch_size, cfg.seed, cfg.stage0_steps), cfg.stage0_steps, opt,
                         desc="stage 0: pre-training on digit names", reports=0)
    os.makedirs(cache_dir, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(model.state_dict(), tmp), what="stage-0 model")
    log(f"stage 0: pre-trained for {cfg.stage0_steps} steps (final running loss {result['loss']:.3f}), "
        f"cached in {path}")
    return model


def run_method(method: str, cfg: DemoConfig, stage0: nn.Module, base: Task, tasks: list, log) -> dict:
    model = copy.deepcopy(stage0)
    config = preset("clip", method=method, rank=cfg.rank, alpha=cfg.alpha, eps_f=cfg.eps_f, seed=cfg.seed,
                    eps_w={"visual": cfg.eps_w_visual, "text": cfg.eps_w_text, "default": cfg.eps_w_visual})
    kl = KeepLoRA(model, config)
    accuracy, base_acc = [], []
    for t, task in enumerate(tasks):
        seed = cfg.seed + 1000 * (t + 1)
        gradient_batches = list(task.batches(cfg.batch_size, seed, max(1, int(10 * cfg.gradient_fraction))))
        model.train()
        kl.begin_task(gradient_batches, classification_loss)
        opt = torch.optim.AdamW(kl.trainable_parameters(), lr=cfg.lr, weight_decay=0.0)
        kl.register_projection_hook(opt)
        torch.manual_seed(seed)
        trained = train_steps(lambda batch: classification_loss(model, batch) + kl.regularization(),
                              task.batches(cfg.batch_size, seed + 1, cfg.task_steps), cfg.task_steps, opt,
                              desc=f"{method}: task {t} ({task.domain.name})", reports=0)
        kl.end_task(list(task.batches(cfg.batch_size, seed + 2, 8)), classification_loss)
        accuracy.append([zero_shot_accuracy(model, other) for other in tasks])
        base_acc.append(zero_shot_accuracy(model, base))
        log(f"{method}: task {t} ({task.domain.name}) trained, final running loss {trained['loss']:.3f}; "
            f"accuracy on it {accuracy[-1][t]:.3f}, on the base domain {base_acc[-1]:.3f}")
    return {"accuracy": accuracy, "base_accuracy": base_acc, **metrics.summary(accuracy)}


def run(cfg: DemoConfig, output: str, cache_dir: str, log=None) -> dict:
    """The whole demo; returns what it writes to ``output/results.json``. Messages go to ``log``
    (default: the ``kplora_kernels`` logger)."""
    from open_clip.tokenizer import SimpleTokenizer

    log = log or logger.info
    start = time.perf_counter()
    try:
        base_domain, domains, source = build_domains(cfg.seed, cfg.fashion, cfg.fashion_root)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    domains = domains[: cfg.max_tasks] if cfg.max_tasks else domains
    tokenizer = SimpleTokenizer(context_length=12)
    base, tasks = Task(base_domain, tokenizer), [Task(d, tokenizer) for d in domains]
    log(f"data: {source}")
    log("tasks: " + "; ".join(f"{t.domain.name} ({', '.join(t.domain.class_names)})" for t in tasks))
    stage0 = pretrain(cfg, base, cache_dir, log)
    base0 = zero_shot_accuracy(stage0, base)
    zero_shot = [zero_shot_accuracy(stage0, t) for t in tasks]
    log(f"stage 0 zero-shot accuracy: base domain {base0:.3f}; tasks " + ", ".join(f"{a:.2f}" for a in zero_shot))
    results = {}
    for method in cfg.methods:
        results[method] = run_method(method, cfg, stage0, base, tasks, log)
        results[method]["base_retention"] = results[method]["base_accuracy"][-1] / max(base0, 1e-9)
    os.makedirs(output, exist_ok=True)
    names = [t.domain.name for t in tasks]
    for method, result in results.items():
        log(f"\n{method}: accuracy (row: after training task i; column: task j)")
        log(" " * 16 + "".join(f"{n[:10]:>11}" for n in names) + f"{'base':>11}")
        for i, row in enumerate(result["accuracy"]):
            log(f"{'after ' + names[i][:9]:<16}" + "".join(f"{a:>11.3f}" for a in row)
                + f"{result['base_accuracy'][i]:>11.3f}")
        heatmap(os.path.join(output, f"heatmap_{method.replace('+', 'p')}.png"),
                f"{method}: BWT {result['bwt']:+.3f}, Last {result['last']:.3f}", result["accuracy"], names,
                extra_columns={f"base: {base_domain.name}": result["base_accuracy"]})
    log(f"\n{'method':<12}{'Transfer':>10}{'Average':>10}{'Last':>10}{'BWT':>10}{'base kept':>11}")
    for method, r in results.items():
        log(f"{method:<12}{r['transfer']:>10.3f}{r['average']:>10.3f}{r['last']:>10.3f}{r['bwt']:>+10.3f}"
            f"{r['base_retention']:>11.2f}")
    elapsed = time.perf_counter() - start
    report = {"config": dataclasses.asdict(cfg), "data": source, "tasks": names,
              "stage0": {"base_accuracy": base0, "task_zero_shot": zero_shot},
              "methods": {m: {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                          for m, r in results.items()},
              "seconds": elapsed}
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    log(f"\ndata: {source}")
    count = f"{len(results)} heatmap{'' if len(results) == 1 else 's'}"
    log(f"wrote {output}/results.json and {count} (tasks and the base domain); {elapsed:.0f} s in all")
    return report


def default_cache_dir() -> str:
    """Where the stage-0 model is cached: ``$XDG_CACHE_HOME/kplora_kernels`` (default ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "kplora_kernels")


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "settings of --config (JSON or YAML; key = default: meaning [allowed]):\n" + describe_settings(DemoConfig)
    parser.add_argument("--config", help="a JSON or YAML file with any of the settings below")
    parser.add_argument("--output", default="demo_output", help="where results go (default: demo_output)")
    parser.add_argument("--cache-dir", default=None, help=f"where the stage-0 model is cached (default: {default_cache_dir()})")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")


def main(args) -> dict:
    """``kplora demo``: the settings and packages checked, then :func:`run`."""
    config = DemoConfig.from_file(args.config, seed=args.seed)
    require_packages("demo", {"sklearn": "scikit-learn", "open_clip": "open_clip_torch",
                              "matplotlib": "matplotlib"}, "demo")
    return run(config, args.output, args.cache_dir or default_cache_dir())
