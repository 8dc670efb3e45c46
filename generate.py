"""Generate with learned concepts: `python generate.py prompt="a photo of <my-cat>" concepts=[...]`."""

import sys

import hydra
from omegaconf import DictConfig

import conceptlab.generate
from conceptlab.config import CONFIG_PATH, register_configs

register_configs()


@hydra.main(config_path=CONFIG_PATH, config_name="generate", version_base="1.3")
def generate(cfg: DictConfig) -> None:
    conceptlab.generate.main(cfg)


if __name__ == "__main__":
    sys.argv[1:] = conceptlab.generate.quote_text_overrides(sys.argv[1:])
    generate()
