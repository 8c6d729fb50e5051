"""The `lowra` command line (also `python -m bitsandbytes_lowra`)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    print("lowra demo: the end-to-end demo (quantize SmolLM2-135M at 4/2.5/2/1.75 bits with LowRA and QLoRA, "
          "evaluate perplexity) is not available yet in this build; it lands with the evaluation harness.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowra", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the embedded default model and data")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
