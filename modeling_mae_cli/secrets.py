"""Secrets (Hub tokens, passwords) never leave the process: every config that is printed, saved,
logged to a tracker or written into a model card goes through `mask_secrets` first.

A field is secret when its name says so (`token`, `secret`, `password`, `api_key`, in any case);
its value is shown as `MASK` (None stays None, so "no token" is still visible). The real value
stays on the in-memory config, so a resumed run gets it again from the flag or `HF_TOKEN`, never
from a saved file.
"""

from __future__ import annotations

import re
from typing import Any


MASK = "***"
SECRET_NAME = re.compile(r"token|secret|password|passwd|api_?key|credential", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(str(name)))


def mask_secrets(values: Any) -> Any:
    """A copy of `values` (nested dicts / lists) with every secret-named entry's value replaced by MASK."""
    if isinstance(values, dict):
        return {
            key: (MASK if value not in (None, "", False) else value) if is_secret_name(key) else mask_secrets(value)
            for key, value in values.items()
        }
    if isinstance(values, (list, tuple)):
        return type(values)(mask_secrets(v) for v in values)
    return values
