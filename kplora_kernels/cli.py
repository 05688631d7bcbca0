"""The ``kplora`` command line (also ``python -m kplora_kernels``).

Every command checks its settings (:mod:`kplora_kernels.config_file`) and the packages it needs
before it loads any data or model; a user error is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .config_file import ConfigError, check_settings, describe_settings, require_packages
from .llava import add_arguments as add_llava_arguments
from .mtil import add_arguments as add_mtil_arguments
from .vlm import add_arguments as add_vlm_arguments


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "kplora_kernels")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig
    from .memory import DTYPE_BYTES

    parser = argparse.ArgumentParser(prog="kplora", description="KeepLoRA++ continual learning tools")
    parser.add_argument("--version", action="version", version=f"kplora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a continual-learning run on embedded data, compared across methods",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="settings of --config (JSON or YAML; key = default: meaning [allowed]):\n"
                                 + describe_settings(DemoConfig))
    demo.add_argument("--config", help="a JSON or YAML file with any of the settings below")
    demo.add_argument("--output", default="demo_output", help="where results go (default: demo_output)")
    demo.add_argument("--cache-dir", default=None, help=f"where the stage-0 model is cached (default: {default_cache_dir()})")
    demo.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    add_mtil_arguments(sub.add_parser("mtil", help="the MTIL benchmark (11 datasets) for an open_clip model"))
    add_llava_arguments(sub.add_parser("llava", help="continual instruction tuning of a LLaVA model"))
    add_vlm_arguments(sub.add_parser("vlm", help="continual instruction tuning of any transformers vision-language "
                                                 "model, images and video"))
    from .kernel_report import add_arguments as add_kernels_arguments

    add_kernels_arguments(sub.add_parser("kernels", help="compile every Triton kernel for sm_80/86/89/90 (no GPU) "
                                                        "and report shared memory, registers, stack, fits"))
    memory = sub.add_parser("memory", help="what the KeepLoRA++ state costs for an LLM config")
    memory.add_argument("--model-config", required=True,
                        help="llava-1.5-7b, llava-1.5-13b, llava-next-video-7b, qwen2.5-vl-7b or a config.json")
    memory.add_argument("--rank", type=int, default=32, help="adapter rank r (default 32)")
    memory.add_argument("--basis-fraction", type=float, default=0.5, help="k_in / in, in [0, 1) (default 0.5)")
    memory.add_argument("--param-dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    memory.add_argument("--basis-dtype", choices=sorted(DTYPE_BYTES), default="fp32")
    memory.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    memory.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    memory.add_argument("--video-tokens", type=int, default=0,
                        help="image/video tokens per sequence beside --seq-len (a VLM's media, default 0)")
    memory.add_argument("--tasks", type=int, default=8, help="tasks, for the checkpoint sizes (default 8)")
    memory.add_argument("--resident-layers", type=int, default=2,
                        help="adapted linears' bases on the device at once while a boundary finalises, with the "
                             "'cpu' placement (default 2: the current one and the prefetched next)")
    memory.add_argument("--sketch-budget", default="64MiB", help="bytes per sketch, e.g. 64MiB (default 64MiB)")
    memory.add_argument("--device-memory", default=None, help="the accelerator's memory, e.g. 24GiB, 80GB, 24000MiB")
    memory.add_argument("--reserve", default="1GiB",
                        help="device memory the peaks do not count: CUDA context, fragmentation (default 1GiB)")
    memory.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _memory(args) -> None:
    from .memory import MemoryArgs, format_plan, linear_shapes, parse_size, plan, text_config

    check_settings(MemoryArgs, {"rank": args.rank, "basis_fraction": args.basis_fraction, "seq_len": args.seq_len,
                                "micro_batch": args.micro_batch, "tasks": args.tasks,
                                "resident_layers": args.resident_layers}, "kplora memory")
    if args.video_tokens < 0:
        raise ConfigError(f"--video-tokens must be an integer ≥ 0, got {args.video_tokens}")
    sketch_budget = parse_size(args.sketch_budget, "--sketch-budget")
    device_memory = None if args.device_memory is None else parse_size(args.device_memory, "--device-memory")
    reserve = parse_size(args.reserve, "--reserve", allow_zero=True)
    cfg = text_config(args.model_config)
    width = min(i for _, _, i in linear_shapes(cfg))
    if args.rank >= width:
        raise ConfigError(f"--rank must be below the layers' input width {width}, got {args.rank}")
    result = plan(cfg, args.rank, args.basis_fraction, args.param_dtype, args.basis_dtype, seq_len=args.seq_len,
                  micro_batch=args.micro_batch, tasks=args.tasks, resident_layers=args.resident_layers,
                  sketch_budget=sketch_budget, device_memory=device_memory, reserve=reserve,
                  media_tokens=args.video_tokens)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


def _demo(args) -> None:
    from .demo import DemoConfig, run

    config = DemoConfig.from_file(args.config, seed=args.seed)
    require_packages("demo", {"sklearn": "scikit-learn", "open_clip": "open_clip_torch",
                              "matplotlib": "matplotlib"}, "demo")
    run(config, args.output, args.cache_dir or default_cache_dir())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .training import setup_logging

    setup_logging()
    try:
        if args.command == "memory":
            _memory(args)
        elif args.command == "llava":
            from .llava import main as run_llava

            run_llava(args)
        elif args.command == "vlm":
            from .vlm import main as run_vlm

            run_vlm(args)
        elif args.command == "mtil":
            from .mtil import main as run_mtil

            run_mtil(args)
        elif args.command == "demo":
            _demo(args)
        elif args.command == "kernels":
            from .kernel_report import run as run_kernels

            return run_kernels(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except ConfigError as exc:  # a user error: one line, no traceback
        print(f"kplora: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`kplora memory --json | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
