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


def check_wandb_environment() -> None:
    """W&B's settings from the environment, checked with W&B's own reader before W&B starts (it refuses a
    whole run over one of them): an empty WANDB_* variable, as CI systems and .env files leave them,
    counts as unset (removed); a value W&B refuses is one line naming the variable and what it accepts."""
    import wandb  # ~1 s: only where a run or a sweep logs to W&B

    for name in [k for k, v in os.environ.items() if k.startswith("WANDB_") and not v.strip()]:
        log.info("%s is empty: treated as unset", name)
        del os.environ[name]
    for name, value in sorted(os.environ.items()):
        if name.startswith("WANDB_"):
            try:
                wandb.Settings().update_from_env_vars({name: value})
            except ValueError as err:  # pydantic's ValidationError is a ValueError
                reason = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
                raise ConfigError(
                    f"{name}={value!r}: W&B refuses it ({reason}); correct it or unset it"
                ) from None


def wandb_mode(cfg: LoggerConfig) -> str:
    """`auto`: WANDB_MODE if set, else online with credentials and offline without."""
    if cfg.mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={cfg.mode!r}: use one of {', '.join(WANDB_MODES)}")
    check_wandb_environment()
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
