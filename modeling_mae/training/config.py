"""One typed config per script: a dataclass filled from a YAML file, then command-line overrides.

    cfg = parse_config(PretrainConfig)            # reads sys.argv: --config FILE.yaml --flag value ...
    cfg = parse_config(PretrainConfig, ["--config", "configs/pretrain/demo.yaml", "--seed", "1"])

Rules: unknown keys (in the YAML or on the command line) are rejected with a message naming them;
values are converted to the field's type (int, float, bool, str, lists, Optional[...]). Declare configs
with `@dataclasses.dataclass(frozen=True)` so nothing mutates them after parsing; validate in
`__post_init__`. `to_yaml(cfg)` / `to_dict(cfg)` serialise it, with secrets masked (`secrets.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A config file or flag names an unknown field or holds a value of the wrong type."""


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(name: str, tp, value: Any):
    """Convert `value` (from YAML or a CLI string) to the annotated type `tp`."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"config field `{name}` must be a {getattr(tp, '__name__', tp)}, got None")
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_convert(f"{name}[]", item_tp, v) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config field `{name}` must be a bool (true/false), got {value!r}")
    if tp in (int, float):
        try:
            if isinstance(value, str):
                value = yaml.safe_load(value)  # accepts 1e-4, 3, 1_000
            if isinstance(value, bool):
                raise TypeError
            converted = tp(value)
            if tp is int and converted != value:
                raise TypeError
            return converted
        except (TypeError, ValueError):
            raise ConfigError(f"config field `{name}` must be {tp.__name__}, got {value!r}") from None
    if tp is str:
        return str(value)
    if tp is dict or typing.get_origin(tp) is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config field `{name}` must be a mapping, got {value!r}")
        return value
    return value


def _resolve_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls, values: dict, source: str = "config"):
    """Build the dataclass `cls` from a mapping; unknown keys raise ConfigError naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in {source}: {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    hints = _resolve_hints(cls)
    kwargs = {k: _convert(k, hints[k], v) for k, v in values.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def parse_config(cls, argv: Sequence[str] | None = None, description: str | None = None):
    """`--config FILE.yaml` (optional) then `--field value` overrides for every dataclass field."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="YAML file with config keys")
    hints = _resolve_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        if tp is bool:
            # `--flag` alone means true; `--flag false` works too
            parser.add_argument(f"--{f.name}", nargs="?", const="true", default=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{f.name}", type=str, default=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown command-line argument(s): {' '.join(unknown)}")
    values = load_yaml(args.config) if args.config else {}
    base = from_dict(cls, values, source=args.config or "config")  # validates YAML keys first
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    merged = {**dataclasses.asdict(base), **overrides}
    return from_dict(cls, merged, source="command line")


def to_dict(cfg) -> dict:
    """The config as a dict for saving, printing and trackers: secrets (hub_token, ...) masked."""
    from .secrets import mask_secrets

    return mask_secrets(dataclasses.asdict(cfg))


def to_yaml(cfg) -> str:
    """The config as YAML (config.yaml, checkpoints, model cards, stdout): secrets masked."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
