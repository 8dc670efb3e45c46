"""Measure what concepts learned: `python evaluate.py run=<run dir>` (Hydra; `--help` lists the options)."""

import hydra
from omegaconf import DictConfig

import conceptlab.evaluate
from conceptlab.config import CONFIG_PATH, register_configs

register_configs()


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
def evaluate(cfg: DictConfig) -> None:
    conceptlab.evaluate.main(cfg)


if __name__ == "__main__":
    evaluate()
