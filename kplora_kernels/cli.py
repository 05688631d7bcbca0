"""The ``kplora`` command line (also ``python -m kplora_kernels``)."""
from __future__ import annotations

import argparse
import os
import sys

from .config_file import ConfigError
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
    args = parser.parse_args(argv)
    try:
        if args.command == "mtil":
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
