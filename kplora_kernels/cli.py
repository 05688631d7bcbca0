"""The ``kplora`` command line (also ``python -m kplora_kernels``).

Every command checks its settings (:mod:`kplora_kernels.config_file`) and the packages it needs
before it loads any data or model; a user error is one line on stderr and exit status 2. The
commands live in :mod:`kplora_kernels.commands` (``kernels`` in :mod:`kplora_kernels.kernel_report`);
each has ``add_arguments(parser)`` and a function that runs it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .config_file import ConfigError

# name, module, the function that runs it, help line
COMMANDS = (
    ("demo", "kplora_kernels.commands.demo", "main",
     "a continual-learning run on embedded data, compared across methods"),
    ("mtil", "kplora_kernels.commands.mtil", "main", "the MTIL benchmark (11 datasets) for an open_clip model"),
    ("llava", "kplora_kernels.commands.llava", "main", "continual instruction tuning of a LLaVA model"),
    ("vlm", "kplora_kernels.commands.vlm", "main",
     "continual instruction tuning of any transformers vision-language model, images and video"),
    ("kernels", "kplora_kernels.kernel_report", "run",
     "compile every Triton kernel for sm_80/86/89/90 (no GPU) and report shared memory, registers, stack, fits"),
    ("memory", "kplora_kernels.commands.memory", "main", "what the KeepLoRA++ state costs for an LLM config"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kplora", description="KeepLoRA++ continual learning tools")
    parser.add_argument("--version", action="version", version=f"kplora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, _, help_line in COMMANDS:
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_line))
    return parser


def main(argv=None) -> int:
    """Run ``kplora`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status: 0, 2 for a
    user error (one line on stderr), 1 when stdout was closed, or what ``kplora kernels`` returns."""
    args = build_parser().parse_args(argv)
    from .training import setup_logging

    setup_logging()
    module, function = next((m, f) for name, m, f, _ in COMMANDS if name == args.command)
    try:
        result = getattr(importlib.import_module(module), function)(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except ConfigError as exc:  # a user error: one line, no traceback
        print(f"kplora: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`kplora memory --json | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
