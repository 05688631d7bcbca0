"""``kplora mtil``: the MTIL benchmark (11 datasets, Order I or II) for an open_clip model.

Trains the task sequence with the controller (the authors' hyper-parameters by default),
evaluates every dataset after every stage in its own label space (zero-shot with class names and
the dataset's prompt template), and writes the accuracy matrix, Transfer / Average / Last, a
heatmap and per-dataset rows. After every task it writes ``controller.safetensors`` and
``progress.json``; a rerun with the same output folder resumes after the last finished task.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
from dataclasses import dataclass

import torch

from .config_file import ConfigError, load_settings
from .continual import KeepLoRA, preset
from .continual import zero_shot
from .continual.runs import ResumableRun
from .data import mtil as datasets


@dataclass
class MTILConfig:
    """Training settings; defaults are the authors' for CLIP ViT-B/16."""

    method: str = "keeplora++"
    rank: int = 16
    alpha: float = 1.0
    eps_w_visual: float = 0.85
    eps_w_text: float = 0.2
    eps_f: float = 0.99
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    iterations: int = 1000
    gradient_batches: int = 20  # batches for the task-start gradient
    subspace_batches: int = 20  # batches for the task-end input subspace
    eval_batch_size: int = 256
    max_eval_samples: int | None = None  # per dataset; None: the whole test split
    workers: int = 4
    seed: int = 0


def _epochs(loader):
    """The loader's batches, epoch after epoch (fresh shuffles and augmentations, nothing kept)."""
    while len(loader):
        yield from loader


class Benchmark:
    def __init__(self, args, config: MTILConfig, log=print):
        self.args, self.config, self.log = args, config, log
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        order = datasets.ORDER_I if args.order == "I" else datasets.ORDER_II
        if args.datasets:
            wanted = [d.strip() for d in args.datasets.split(",") if d.strip()]
            unknown = [d for d in wanted if d not in datasets.LOADERS]
            if unknown:
                raise ConfigError(f"unknown datasets {unknown}; MTIL datasets: {', '.join(datasets.ORDER_I)}")
            order = [d for d in order if d in wanted]
        self.names = order

    def load_data(self):
        splits = []
        for name in self.names:
            try:
                split = datasets.load(name, self.args.data_root)
            except FileNotFoundError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            self.log(f"{name}: {len(split.classnames)} classes, {len(split.train)} train / {len(split.test)} test")
            splits.append(split)
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
        def loss(model, batch):
            images, labels = (t.to(self.device, non_blocking=True) for t in batch)
            return zero_shot.classification_loss(model, images, labels, tokens)
        return loss

    @torch.no_grad()
    def evaluate(self, model, split, transform) -> float:
        model.eval()
        items = split.test[: self.config.max_eval_samples] if self.config.max_eval_samples else split.test
        texts = zero_shot.text_features(model, self.class_tokens(split))
        correct = 0
        for images, labels in self.loader(items, transform, train=False, seed=0):
            logits = zero_shot.class_logits(model, images.to(self.device), texts)
            correct += logits.argmax(1).cpu().eq(labels).sum().item()
        return correct / max(len(items), 1)

    def run(self):
        args, cfg, log = self.args, self.config, self.log
        splits = self.load_data()
        model, preprocess_train, preprocess_val = self.load_model()
        log(f"model {args.model} ({args.pretrained}) on {self.device}; order {args.order}: {', '.join(self.names)}")
        if args.dry_run:
            log("dry run: data and weights are in place")
            return None
        run = ResumableRun(args.output, {"datasets": self.names, "model": args.model,
                                         "pretrained": args.pretrained, "config": dataclasses.asdict(cfg)})
        previous = run.previous()
        if previous:
            kl = KeepLoRA.from_checkpoint(model, run.checkpoint)
            rows, throughput = previous["rows"], previous["images_per_second"]
            log(f"resuming after task {len(rows)} ({self.names[len(rows) - 1]})")
        else:
            rows, throughput = [], []
            config = preset("clip", method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, eps_f=cfg.eps_f,
                            seed=cfg.seed, eps_w={"visual": cfg.eps_w_visual, "text": cfg.eps_w_text,
                                                  "default": cfg.eps_w_visual})
            kl = KeepLoRA(model, config)
        for t in range(len(rows), len(splits)):
            split = splits[t]
            torch.manual_seed(cfg.seed + t)  # augmentations draw from it: a resumed run matches
            loss = self.loss_fn(self.class_tokens(split))
            train = self.loader(split.train, preprocess_train, train=True, seed=cfg.seed + t)
            model.train()
            kl.begin_task(train, loss, fraction=min(1.0, cfg.gradient_batches / max(len(train), 1)))
            opt = torch.optim.AdamW(kl.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            kl.register_projection_hook(opt)
            start, seen = time.perf_counter(), 0
            batches = itertools.islice(_epochs(train), cfg.iterations)
            for batch in batches:
                opt.zero_grad()
                loss(model, batch).backward()
                opt.step()
                seen += len(batch[1])
            throughput.append(seen / max(time.perf_counter() - start, 1e-9))
            kl.end_task(train, loss, fraction=min(1.0, cfg.subspace_batches / max(len(train), 1)))
            rows.append([self.evaluate(model, s, preprocess_val) for s in splits])
            run.record(kl, rows, images_per_second=throughput)
            log(f"task {t} ({split.name}): {throughput[-1]:.1f} images/s; accuracy " +
                ", ".join(f"{n} {a:.3f}" for n, a in zip(self.names, rows[-1])))
        return self.report(run, rows, throughput)

    def report(self, run, rows, throughput):
        log = self.log
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
    parser.add_argument("--config", help="JSON or YAML with any MTILConfig settings")
    parser.add_argument("--output", default="mtil_output")
    parser.add_argument("--datasets", help="comma-separated subset, kept in the order's sequence")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dry-run", action="store_true", help="only check the data root and the weights")


def main(args) -> dict | None:
    config = load_settings(MTILConfig, args.config)
    return Benchmark(args, config).run()
