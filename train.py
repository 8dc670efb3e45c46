"""Train one concept: `python train.py method=ti data=objects` (Hydra; `--help` lists the options)."""

from conceptlab.cli import train

if __name__ == "__main__":
    train()
