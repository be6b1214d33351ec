"""Secrets never leave the process: see `modeling_mae_cli.secrets` (standard library only, so the
scripts can mask before torch loads); re-exported here for the training code."""

from modeling_mae_cli.secrets import MASK, SECRET_NAME, is_secret_name, mask_secrets  # noqa: F401
