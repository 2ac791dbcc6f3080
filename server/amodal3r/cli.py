"""The ``amodal3r`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _tiny_weights(args: argparse.Namespace) -> int:
    from .tiny_weights import write_tiny_weights

    out = write_tiny_weights(args.out_dir, seed=args.seed)
    print(f"wrote tiny RANDOM weights (for tests and demos, not a real model) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amodal3r", description="Amodal3R occluded-object reconstruction")
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny-weights", help="write a tiny random model folder in the official layout")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
