"""W&B's mode for a run or a sweep, decided by conceptlab before W&B reads its environment: `logger.mode`,
else WANDB_MODE, else online with credentials and offline without (said once). Light on purpose: a
sweep decides it at its start, before any job imports Lightning or W&B."""

from __future__ import annotations

import logging
import netrc
import os

from .config import LoggerConfig
from .errors import ConfigError

log = logging.getLogger(__name__)
WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_mode(cfg: LoggerConfig) -> str:
    """`auto`: WANDB_MODE if set, else online with credentials and offline without."""
    if cfg.mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={cfg.mode!r}: use one of {', '.join(WANDB_MODES)}")
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if has_wandb_credentials():
        return "online"
    log.warning(
        "W&B: no credentials (WANDB_API_KEY or `wandb login`), logging offline; sync later with `wandb sync`"
    )
    return "offline"


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
