"""Compare the runs of a sweep: `python scripts/report.py outputs/multirun/<date>_<time>`.

Writes one folder (default: <sweep>/report): report.html (opens offline), runs.csv, plots/, samples/.
With --wandb-group the table comes from a W&B group instead (online, credentials needed).
"""

import argparse
import sys
from pathlib import Path

from conceptlab.errors import ConceptLabError
from conceptlab.report import collect, runs_from_wandb, write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", help="a multirun folder, a run, or a folder of runs")
    parser.add_argument("--out", help="report folder (default: <folder>/report)")
    parser.add_argument("--wandb-group", help="read the runs of this W&B group instead of a folder")
    parser.add_argument("--wandb-project", default="conceptlab")
    parser.add_argument("--wandb-entity", default=None)
    args = parser.parse_args(argv)
    if not args.folder and not args.wandb_group:
        parser.error("give a folder, or --wandb-group")
    try:
        if args.wandb_group:
            sweep = runs_from_wandb(args.wandb_group, args.wandb_project, args.wandb_entity)
            out = Path(args.out or f"report-{args.wandb_group}")
        else:
            sweep = collect(args.folder)
            out = Path(args.out or Path(args.folder) / "report")
        page = write_report(sweep, out)
    except ConceptLabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = sweep.runs["status"].value_counts().to_dict()
    print(f"{page}  ({len(sweep.runs)} runs: {', '.join(f'{n} {s}' for s, n in counts.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
