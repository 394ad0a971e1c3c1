"""The ``rsd`` command. Each subcommand lives in the module that does the work.

A subcommand module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Only the chosen subcommand's module is imported, so ``rsd info`` stays fast and ``rsd --help`` never
imports LIBERO or torch. Typed errors (``rsd.errors``) print their message and exit 1; set ``RSD_TRACEBACK=1``
to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rsd.errors import RSDError

# name -> (module, one-line help shown by `rsd --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("rsd.info", "versions, devices and the headless rendering backend in use"),
    "bench": ("rsd.bench", "latency table for the pipeline parts (backbone, heads, decode, predict_chunk)"),
    "eval": ("rsd.eval.cli", "evaluate a policy on LIBERO with the OpenVLA-OFT protocol"),
    "merge": ("rsd.eval.merge", "combine the run directories of rsd eval --shard i/N into one run"),
    "collect": ("rsd.collect", "record scripted-expert episodes to HDF5 (LIBERO demo layout)"),
    "render-demos": ("rsd.train.render_views", "render both camera views of unrendered demos by re-running them"),
    "train-tokenizer": ("rsd.train.tokenizer_cli", "fit the RFSQ tokenizer on recorded action chunks"),
    "sensitivity": ("rsd.sensitivity", "task success vs token accuracy: demos replayed with corrupted tokens"),
    "train-policy": ("rsd.train.policy_cli", "train a low-dimensional RSD policy (RFSQ + draft + L1 heads) on demos"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsd",
        description="rsd: Residual-FSQ action tokens with speculative decoding, validated on LIBERO.",
        epilog="Run `rsd <command> --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = _top_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # prints --help / an error listing the commands, and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"rsd {name}", description=getattr(module, "__doc__", None) or help_text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except RSDError as exc:  # typed errors carry the fix in their message: show it without a traceback
        print(f"rsd {name}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("RSD_TRACEBACK"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
