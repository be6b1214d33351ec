"""Weights files get the same permissions as every other file a save writes.

`safetensors.torch.save_file` creates its file with mode 0600 (owner only), whatever the umask, so a
saved model directory held `model.safetensors` unreadable by the group that can read its config.
`give_usual_mode` sets the mode a plain `open(path, "w")` would have given (0666 minus the umask).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def usual_file_mode() -> int:
    """0o666 & ~umask (the umask is read by setting it and restoring it at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def give_usual_mode(paths: Iterable[str | os.PathLike]) -> None:
    mode = usual_file_mode()
    for path in paths:
        if Path(path).is_file():
            os.chmod(path, mode)


def give_weights_usual_mode(directory: str | os.PathLike) -> None:
    """`give_usual_mode` for the `*.safetensors` files directly in `directory`."""
    give_usual_mode(Path(directory).glob("*.safetensors"))
