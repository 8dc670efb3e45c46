"""Measure what concepts learned: `python evaluate.py run=<run dir>` (Hydra; `--help` lists the options)."""

from conceptlab.cli import evaluate

if __name__ == "__main__":
    evaluate()
