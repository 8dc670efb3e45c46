"""Train one concept: `python train.py method=ti data=objects` (Hydra; `--help` lists the options)."""

import hydra
from omegaconf import DictConfig

import conceptlab.train
from conceptlab.config import CONFIG_PATH, register_configs

register_configs()


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> None:
    conceptlab.train.main(cfg)


if __name__ == "__main__":
    train()
