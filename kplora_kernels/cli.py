"""The ``kplora`` command line (also ``python -m kplora_kernels``)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config_file import ConfigError
from .llava import add_arguments as add_llava_arguments
from .mtil import add_arguments as add_mtil_arguments


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "kplora_kernels")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kplora", description="KeepLoRA++ continual learning tools")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a continual-learning run on embedded data, compared across methods")
    demo.add_argument("--config", help="a JSON or YAML file with any of the demo's settings (see README)")
    demo.add_argument("--output", default="demo_output", help="where results go (default: demo_output)")
    demo.add_argument("--cache-dir", default=None, help=f"where the stage-0 model is cached (default: {default_cache_dir()})")
    demo.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    add_mtil_arguments(sub.add_parser("mtil", help="the MTIL benchmark (11 datasets) for an open_clip model"))
    add_llava_arguments(sub.add_parser("llava", help="continual instruction tuning of a LLaVA model"))
    memory = sub.add_parser("memory", help="what the KeepLoRA++ state costs for an LLM config")
    memory.add_argument("--model-config", required=True, help="llava-1.5-7b, llava-1.5-13b or a config.json")
    memory.add_argument("--rank", type=int, default=32)
    memory.add_argument("--basis-fraction", type=float, default=0.5, help="k_in / in (default 0.5)")
    memory.add_argument("--param-dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    memory.add_argument("--basis-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    memory.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        if args.command == "memory":
            from .memory import format_report, report, text_config

            try:
                cfg = text_config(args.model_config)
            except (FileNotFoundError, ValueError) as exc:
                raise ConfigError(str(exc)) from None
            if not 0.0 <= args.basis_fraction < 1.0 or args.rank < 1:
                raise ConfigError("--basis-fraction must be in [0, 1) and --rank ≥ 1")
            result = report(cfg, args.rank, args.basis_fraction, args.param_dtype, args.basis_dtype)
            print(json.dumps(result, indent=2) if args.json else format_report(result))
        elif args.command == "llava":
            from .llava import main as run_llava

            run_llava(args)
        elif args.command == "mtil":
            from .mtil import main as run_mtil

            run_mtil(args)
        elif args.command == "demo":
            from .demo import DemoConfig, run

            config = DemoConfig.from_file(args.config, seed=args.seed)
            run(config, args.output, args.cache_dir or default_cache_dir())
    except ConfigError as exc:  # a user error: one line, no traceback
        print(f"kplora: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
