"""Pretrain the toy world's backbone and judge, export them (fp16) and measure caption following.

    python scripts/pretrain_toyworld.py                      # the recipe; ~1 h on 2 CPU cores
    python scripts/pretrain_toyworld.py --unet-steps 200 --out /tmp/toy --work /tmp/toy-work   # a quick try
    python scripts/pretrain_toyworld.py --only-clip          # (re)train just the toy CLIP into the checkpoint

Resumable: rerun the same command after an interruption. Every field of PretrainConfig is a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from conceptlab.toyworld.pretrain import PretrainConfig, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(PretrainConfig):
        if f.name == "mix":
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help="a switch")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"default: {f.default}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        results = pretrain(PretrainConfig(**vars(args)))
    except ValueError as err:  # a flag that cannot work: one line, before any stage runs
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
