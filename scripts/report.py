"""Compare the runs of a sweep: `python scripts/report.py outputs/multirun/<date>_<time>`.

Writes one folder (default: <sweep>/report): report.html (opens offline), runs.csv, plots/, samples/.
With --wandb-group the table comes from a W&B group instead (online, credentials needed). The same
as the installed `conceptlab-report`.
"""

from conceptlab.cli import report

if __name__ == "__main__":
    report()
