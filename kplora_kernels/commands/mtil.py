"""``kplora mtil``: the MTIL benchmark (11 datasets, Order I or II) for an open_clip model.

Trains the task sequence with the controller (the authors' hyper-parameters by default),
evaluates every dataset after every stage in its own label space (zero-shot with class names and
the dataset's prompt template), and writes the accuracy matrix, Transfer / Average / Last, a
heatmap and per-dataset rows. After every task it writes ``controller.safetensors`` and
``progress.json``; a rerun with the same output folder resumes after the last finished task.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import torch

from ..continual.config import KeepLoRAConfig
from ..config_file import ConfigError, load_settings, require_packages, result_settings, setting
from ..continual import KeepLoRA, preset, zero_shot
from ..data import mtil as datasets
from ..training import SCHEDULES, autocast, check_tensorboard, progress, seed_everything
from ..training import log as logger
from .common import add_run_arguments, fit_task, run_sequence


@dataclass
class MTILConfig:
    """Training settings (``--config`` keys); defaults are the authors' for CLIP ViT-B/16."""

    method: str = KeepLoRAConfig.setting("method")
    rank: int = KeepLoRAConfig.setting("rank", 16)
    alpha: float = KeepLoRAConfig.setting("alpha", 1.0)
    eps_w_visual: float = KeepLoRAConfig.setting("eps_w", 0.85, "ε_w of the image tower's principal subspaces")
    eps_w_text: float = KeepLoRAConfig.setting("eps_w", 0.2, "ε_w of the text tower's principal subspaces")
    eps_f: float = KeepLoRAConfig.setting("eps_f", 0.99)
    lr: float = setting(1e-3, "peak learning rate (AdamW)", gt=0)
    lr_schedule: str = setting("onecycle", "per-step schedule within a task (the authors: OneCycleLR)",
                               choices=SCHEDULES)
    warmup_fraction: float = setting(0.3, "share of a task's steps spent warming up (OneCycle's pct_start)",
                                     ge=0, lt=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    batch_size: int = setting(64, "images per batch", ge=1)
    gradient_accumulation: int = setting(1, "batches averaged per optimizer step", ge=1)
    iterations: int = setting(1000, "optimizer steps per task", ge=1)
    amp: bool = setting(True, "bf16 autocast for training and evaluation on CUDA (no effect on the CPU)")
    gradient_batches: int = setting(20, "batches for the task-start gradient", ge=1)
    subspace_batches: int = setting(20, "batches for the task-end input subspace", ge=1)
    eval_batch_size: int = setting(256, "images per evaluation batch", ge=1, affects_results=False)
    max_eval_samples: int | None = setting(None, "test images per dataset (null: the whole test split)", ge=1)
    workers: int = setting(4, "DataLoader worker processes (they draw the augmentations)", ge=0)
    seed: int = setting(0, "seed of shuffling, augmentations and the controller", ge=0)


def _epochs(loader):
    """The loader's batches, epoch after epoch (fresh shuffles and augmentations, nothing kept)."""
    while len(loader):
        yield from loader


class Benchmark:
    def __init__(self, args, config: MTILConfig, log=None):
        self.args, self.config, self.log = args, config, log or logger.info
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        order = datasets.ORDER_I if args.order == "I" else datasets.ORDER_II
        if args.datasets:
            wanted = [d.strip() for d in args.datasets.split(",") if d.strip()]
            unknown = [d for d in wanted if d not in datasets.LOADERS]
            if unknown:
                raise ConfigError(f"unknown datasets {unknown}; MTIL datasets: {', '.join(datasets.ORDER_I)}")
            order = [d for d in order if d in wanted]
        self.names = order
        packages = {"open_clip": "open_clip_torch", "PIL": "pillow", "matplotlib": "matplotlib"}
        if {"Flowers", "StanfordCars"} & set(order):  # their labels are .mat files
            packages["scipy"] = "scipy"
        require_packages("mtil", packages, "clip")
        if args.log_dir is not None:
            check_tensorboard()

    def load_data(self):
        """Every dataset of the sequence; all missing ones are reported together."""
        root = self.args.data_root
        if not os.path.isdir(root):
            raise ConfigError(f"--data-root {root} is not a folder")
        splits, missing = [], []
        for name in self.names:
            try:
                split = datasets.load(name, root)
            except FileNotFoundError as exc:
                missing.append(f"{name}: {exc}")
                continue
            except ValueError as exc:  # a file in place that cannot be read (a damaged MNIST IDX file)
                raise ConfigError(f"{name}: {exc}") from None
            self.log(f"{name}: {len(split.classnames)} classes, {len(split.train)} train / {len(split.test)} test")
            splits.append(split)
        if missing:
            raise ConfigError(f"{len(missing)} of {len(self.names)} datasets missing under {root}: " + "; ".join(missing))
        return splits

    def load_model(self):
        import open_clip

        args = self.args
        if args.model_config:
            if not os.path.isfile(args.model_config):
                raise ConfigError(f"model config not found: {args.model_config}")
            open_clip.add_model_config(args.model_config)
        if args.pretrained != "openai" and not os.path.isfile(args.pretrained):
            raise ConfigError(f"weights not found: {args.pretrained} (give 'openai' or a checkpoint file)")
        try:
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                args.model, pretrained=args.pretrained, device=self.device)
        except Exception as exc:  # unknown model name, weights that do not fit, no network for 'openai'
            raise ConfigError(f"cannot load model {args.model!r} with weights {args.pretrained!r}: {exc}") from None
        self.tokenizer = open_clip.get_tokenizer(args.model)
        return model, preprocess_train, preprocess_val

    def identity(self) -> dict:
        """What a resumed run must share with the saved one: what changes the results."""
        args = self.args
        pretrained = args.pretrained if args.pretrained == "openai" else os.path.realpath(args.pretrained)
        return {"datasets": self.names, "model": args.model, "pretrained": pretrained,
                "config": result_settings(self.config)}

    def loader(self, items, transform, train: bool, seed: int):
        from torch.utils.data import DataLoader

        cfg = self.config
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(datasets.ImageDataset(items, transform), batch_size=cfg.batch_size if train else cfg.eval_batch_size,
                          shuffle=train, drop_last=train and len(items) >= cfg.batch_size, generator=gen,
                          num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    def class_tokens(self, split):
        return self.tokenizer([split.template.format(c) for c in split.classnames]).to(self.device)

    def loss_fn(self, tokens):
        """``loss(model, batch)`` for a batch ``(images, labels)`` of this dataset."""
        def loss(model, batch):
            images, labels = (t.to(self.device, non_blocking=True) for t in batch)
            return zero_shot.classification_loss(model, images, labels, tokens)
        return loss

    @torch.no_grad()
    def evaluate(self, model, split, transform) -> float:
        model.eval()
        items = split.test[: self.config.max_eval_samples] if self.config.max_eval_samples else split.test
        loader = self.loader(items, transform, train=False, seed=0)
        with autocast(self.device, self.config.amp):
            texts = zero_shot.text_features(model, self.class_tokens(split))
            correct, seen = 0, 0
            bar = progress(loader, total=len(loader), desc=f"evaluating {split.name}")
            for images, labels in bar:
                logits = zero_shot.class_logits(model, images.to(self.device), texts)
                correct += logits.argmax(1).cpu().eq(labels).sum().item()
                seen += len(labels)
                bar.set_postfix(accuracy=f"{correct / seen:.3f}", refresh=False)
        return correct / max(len(items), 1)

    def run(self):
        args, cfg, log = self.args, self.config, self.log
        export = getattr(args, "export", None)
        if export is not None and not os.path.isdir(os.path.dirname(os.path.abspath(export))):
            raise ConfigError(f"--export {export}: its folder does not exist")
        splits = self.load_data()
        started = time.perf_counter()
        log(f"loading {args.model} ({args.pretrained}) on {self.device}")
        model, preprocess_train, preprocess_val = self.load_model()
        log(f"model {args.model} ({args.pretrained}) on {self.device}; order {args.order}: {', '.join(self.names)}")
        if args.dry_run:
            log("dry run: settings, data and weights are in place")
            return None
        seed_everything(cfg.seed)

        def wrap() -> KeepLoRA:
            config = preset("clip", method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, eps_f=cfg.eps_f,
                            seed=cfg.seed, eps_w={"visual": cfg.eps_w_visual, "text": cfg.eps_w_text,
                                                  "default": cfg.eps_w_visual})
            log(f"wrapping the model ({cfg.method}: principal subspaces of every adapted weight)")
            return KeepLoRA(model, config, bases_cache_dir=getattr(args, "bases_cache", None))

        def train(t, kl, scalars, state):
            images_per_second = self.train_task(t, splits[t], kl, model, preprocess_train, scalars)
            state["images_per_second"].append(images_per_second)
            return f"{images_per_second:.1f} images/s"
        return run_sequence(output=args.output, identity=self.identity(), names=self.names, model=model, wrap=wrap,
                            train=train, evaluate=lambda j: self.evaluate(model, splits[j], preprocess_val),
                            export=self.export, report=self.report, log=log, log_dir=args.log_dir, started=started,
                            records={"images_per_second": []})

    def train_task(self, t, split, kl, model, preprocess_train, scalars) -> float:
        """Train task ``t`` on ``split``; returns the training images per second."""
        cfg = self.config
        torch.manual_seed(cfg.seed + t)  # augmentations draw from it: a resumed run matches
        loss = self.loss_fn(self.class_tokens(split))
        train = self.loader(split.train, preprocess_train, train=True, seed=cfg.seed + t)
        total = cfg.iterations * cfg.gradient_accumulation
        seen = {"images": 0}

        def counted(batches):
            for batch in batches:
                seen["images"] += len(batch[1])
                yield batch
        fraction = lambda batches: min(1.0, batches / max(len(train), 1))  # noqa: E731
        result = fit_task(kl, model, loss, counted(itertools.islice(_epochs(train), total)), total, cfg,
                          start=(train, fraction(cfg.gradient_batches)), end=(train, fraction(cfg.subspace_batches)),
                          device=self.device, desc=f"task {t} ({split.name})", scalars=scalars,
                          step_offset=t * cfg.iterations)
        return seen["images"] / max(result["seconds"], 1e-9)

    def export(self, kl: KeepLoRA) -> None:
        """``--export FILE``: the stock open_clip state dict of the model after the last task
        (:meth:`KeepLoRA.merge_and_unload`: adapters merged, attentions re-packed), as safetensors
        when FILE ends in ``.safetensors``, else with ``torch.save``; it loads with
        ``load_state_dict(..., strict=True)`` into ``open_clip.create_model(name)``."""
        path = getattr(self.args, "export", None)
        if path is None:
            return
        state = {k: v.detach().cpu().contiguous().clone() for k, v in kl.merge_and_unload().state_dict().items()}
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, path)
        else:
            torch.save(state, path)
        self.log(f"exported the merged open_clip state dict to {path}")

    def report(self, run, rows, state):
        log, throughput = self.log, state["images_per_second"]
        log("\n" + f"{'':<14}" + "".join(f"{n[:9]:>10}" for n in self.names))
        for name, row in zip(self.names, rows):
            log(f"{'after ' + name[:8]:<14}" + "".join(f"{100 * a:>10.1f}" for a in row))
        result = run.finish(self.names, rows, f"MTIL order {self.args.order}", images_per_second=throughput)
        log(f"\nTransfer {100 * result['transfer']:.1f}  Average {100 * result['average']:.1f}  "
            f"Last {100 * result['last']:.1f}  (BWT {100 * result['bwt']:+.1f}); "
            f"{sum(throughput) / len(throughput):.1f} images/s training")
        return result


def add_arguments(parser) -> None:
    parser.add_argument("--data-root", required=True, help="folder holding the datasets in their MTIL layouts")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    parser.add_argument("--model-config", help="an open_clip model config JSON to register first (custom models)")
    parser.add_argument("--pretrained", default="openai", help="'openai' or a checkpoint file")
    parser.add_argument("--order", choices=["I", "II"], default="I")
    parser.add_argument("--datasets", help="comma-separated subset, kept in the order's sequence")
    add_run_arguments(parser, MTILConfig, output="mtil_output", device_help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dry-run", action="store_true", help="only check the settings, the data and the weights")
    parser.add_argument("--export", metavar="FILE",
                        help="after the last task, write the merged stock open_clip state dict to FILE "
                             "(safetensors for *.safetensors, else torch.save)")


def load_config(args) -> MTILConfig:
    """The settings, checked before any data or model is loaded."""
    return load_settings(MTILConfig, args.config)


def main(args) -> dict | None:
    config = load_config(args)
    return Benchmark(args, config).run()
