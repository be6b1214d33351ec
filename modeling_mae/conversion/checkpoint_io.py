"""Reading and writing checkpoint files of each format.

`.pth` files are read with `torch.load(weights_only=True)`: tensors and plain containers only, no
arbitrary code. The one extra type allowed is `argparse.Namespace`, which official full training
checkpoints pickle under "args".
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..file_modes import give_usual_mode


SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclass
class LoadedCheckpoint:
    """A checkpoint's state dict, and the training arguments when the file carries them."""

    state_dict: dict[str, torch.Tensor]
    args: dict = field(default_factory=dict)  # vars(args) of an official training checkpoint (or our args dict), else {}
    path: str = ""


def load_checkpoint(path: str | os.PathLike, state_dict_key: str | None = None) -> LoadedCheckpoint:
    """Load a `.pth` / `.safetensors` checkpoint on CPU, safely.

    Args:
        path: the file.
        state_dict_key: entry holding the weights; by default `"model"` when the file is a dict with one
            (official checkpoints: `{"model": ..., "optimizer": ..., "args": Namespace, ...}`), else
            the whole file must be a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        obj = load_file(str(path), device="cpu")
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch names the offending global in its message
            raise ValueError(
                f"{path} could not be loaded with torch.load(weights_only=True) (only tensors, plain containers "
                f"and argparse.Namespace are allowed): {err}"
            ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a dict (a state dict or a checkpoint)")

    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else None
    if state_dict_key is not None:
        if state_dict_key not in obj:
            raise ValueError(f"{path} has no entry {state_dict_key!r}; its top-level keys are {sorted(obj)}")
        state_dict = obj[state_dict_key]
    elif isinstance(obj.get("model"), dict):
        state_dict = obj["model"]
    else:
        state_dict = obj
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path}: entries {not_tensors[:8]} are not tensors; pass state_dict_key= (CLI: --state_dict_key) to "
            f"name the entry holding the weights (top-level keys: {sorted(obj)[:12]})"
        )
    return LoadedCheckpoint(dict(state_dict), dict(args) if args is not None else {}, str(path))


def _check_file_target(path: Path, suffixes: tuple[str, ...], fmt: str):
    if path.is_dir():
        raise ValueError(f"{fmt} export writes a file; {path} is a directory (give e.g. {path / ('model' + suffixes[0])})")
    if path.suffix not in suffixes:
        raise ValueError(f"{fmt} export: {path} must end in one of {suffixes}")
    path.parent.mkdir(parents=True, exist_ok=True)


def save_official(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, args: dict | None = None) -> Path:
    """Write `{"model": state_dict, "args": args}` as the official repository does. `args` (see
    `official_args`) is a plain dict of str / int / float / bool / lists, so the file loads with
    `torch.load(weights_only=True)` without allowing any class (official files pickle a Namespace)."""
    path = Path(path)
    _check_file_target(path, (".pth", ".pt"), "official")
    payload = {"model": state_dict}
    if args is not None:
        payload["args"] = dict(args)
    torch.save(payload, path)
    return path


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, fmt: str = "timm") -> Path:
    """Write a bare state dict: safetensors for `.safetensors`, torch.save for `.pth` / `.bin`."""
    path = Path(path)
    _check_file_target(path, SAFETENSORS_SUFFIXES + TORCH_SUFFIXES, fmt)
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
        give_usual_mode([path])  # safetensors writes 0600
    else:
        torch.save(state_dict, path)
    return path


def fetch_checkpoint(location: str, filename: str = "model.safetensors") -> Path:
    """A local file for `location`: an existing path, an http(s) URL (downloaded once into torch's hub
    cache, as the official weights are published), or a Hub repository id such as
    `timm/vit_base_patch16_224.mae` (its `filename` fetched with huggingface_hub)."""
    path = Path(location)
    if path.is_file():
        return path
    if location.startswith(("http://", "https://")):
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(location.split("?")[0])
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(location, str(target))
        return target
    if path.exists():
        raise ValueError(f"{location} is a directory; --source official/timm expect a checkpoint file")
    if location.count("/") == 1 and not location.startswith((".", "/")):
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(location, filename))
    raise FileNotFoundError(f"{location} is neither a file, a URL nor a Hub repository id")
