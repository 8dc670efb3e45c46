"""`conceptlab <command> ...` and `python -m conceptlab <command> ...`: train, generate, report.

conceptlab train method=ti data=objects        (= conceptlab-train, python train.py in a checkout)
conceptlab generate prompt="a <my-cat>" concepts=[outputs/runs/...]
conceptlab evaluate run=outputs/runs/<run>     (= python evaluate.py in a checkout)
conceptlab report outputs/multirun/<date>_<time>
conceptlab --version
"""

from __future__ import annotations

import sys
from importlib import import_module

from conceptlab import __version__

COMMANDS = {
    "train": "conceptlab.cli:train",
    "generate": "conceptlab.cli:generate",
    "evaluate": "conceptlab.cli:evaluate",
    "report": "conceptlab.cli:report",
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["--version"], ["-V"]):
        print(f"conceptlab {__version__}")
        return
    if not args or args[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(0 if args[:1] in (["-h"], ["--help"]) else 2)

    module, _, function = COMMANDS[args[0]].partition(":")
    # The command's own parser (Hydra's or argparse's) reads the rest of the command line.
    sys.argv = [f"conceptlab {args[0]}", *args[1:]]
    getattr(import_module(module), function)()


if __name__ == "__main__":
    main()
