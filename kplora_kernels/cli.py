"""The ``kplora`` command line (also ``python -m kplora_kernels``)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kplora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a small continual-learning run on embedded data (digits)")
    demo.add_argument("--steps", type=int, default=300, help="optimizer steps per task (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eps-f", type=float, default=0.97, help="GPM energy threshold in (0, 1]")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error(f"--steps must be ≥ 1, got {args.steps}")
        if not 0.0 < args.eps_f <= 1.0:
            parser.error(f"--eps-f must be in (0, 1], got {args.eps_f}")
        from .demo import run

        run(steps=args.steps, seed=args.seed, eps_f=args.eps_f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
