"""One typed config per script: a dataclass filled from a YAML file, then command-line overrides.

    @dataclass(frozen=True)
    class PretrainConfig:
        seed: int = option(0, help="seed of the model's initialisation, the masks and the data order")
        mask_strategy: str = option("random", help="which patches are removed", choices=("random", "block"))

    cfg = parse_config(PretrainConfig)            # reads sys.argv: --config FILE.yaml --flag value ...
    cfg = parse_config(PretrainConfig, ["--config", "configs/pretrain/demo.yaml", "--seed", "1"])

The dataclass is the one source of the YAML keys, the flags and `--help`: each field's `option(...)`
carries its help line and, where the values are a closed set, its choices (the metadata keys are the
ones transformers' `HfArgumentParser` reads, so the dataclasses work there too). Values from YAML and
from the command line go through the same conversion to the field's type (int, float, bool, str,
lists, mappings, Optional[...]) and the same choice check; the dataclass's `__post_init__` validates
the rest. A field whose metadata says `hub_or_path` (a model to load) fails at once when its value looks
like a local path that does not exist, rather than after a Hub request.

Errors are `ConfigError`s naming the flag or key, the expected and the actual value, with a "did you
mean" for misspelt names. Reading the real command line (`argv=None`), they end the program as
argparse does: a short usage line, one error line, exit status 2. With an explicit `argv` they are
raised (tests, programs).

Why our own parser rather than `HfArgumentParser`: YAML and command-line values must be converted and
checked by one code path (HfArgumentParser leaves YAML values unconverted and has no YAML + flag
merge), mappings (`--model_config '{drop_path_rate: 0.1}'`) and `a,b` lists must keep working as
the recipes and README use them, and `--help` must answer without importing transformers (about a
second of the 2 s budget on a small machine). This module needs only the standard library and PyYAML.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A config file or flag names an unknown field or holds a value of the wrong type or range."""


def option(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence | None = None,
           hub_or_path: bool = False):
    """A config field with its help line (and choices): `field(default=..., metadata={"help": ...})`.

    Mutable defaults (lists, dicts) are copied per instance. `hub_or_path=True` marks a model location
    (directory, checkpoint file or Hub id): a value that looks like a local path must exist."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if hub_or_path:
        metadata["hub_or_path"] = True
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------------
# Values: one conversion for YAML and command-line strings
# --------------------------------------------------------------------------------------------------
class _BadValue(ValueError):
    """A value that cannot become the field's type; the caller adds where it came from."""


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    tp, _ = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return f"a list of {_type_name(item)}"
    if tp is dict or origin is dict:
        return "a mapping"
    if tp is bool:
        return "a bool (true/false)"
    return {int: "an int", float: "a float", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp, value: Any):
    """`value` (from YAML, or a command-line string) as the annotated type `tp`; _BadValue otherwise."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or tp is Any:
            return None
        raise _BadValue(f"expected {_type_name(tp)}, got None")
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_convert(item_tp, v) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise _BadValue(f"expected a bool (true/false), got {value!r}")
    if tp in (int, float):
        try:
            parsed = yaml.safe_load(value) if isinstance(value, str) else value  # accepts 1e-4, 3, 1_000
            if isinstance(parsed, str) and tp is float:
                parsed = float(parsed)  # YAML 1.1 reads `1e-4` (no dot) as a string
            if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
                raise TypeError
            converted = tp(parsed)
            if tp is int and converted != parsed:
                raise TypeError
            return converted
        except (TypeError, ValueError, yaml.YAMLError):
            raise _BadValue(f"expected {_type_name(tp)}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise _BadValue(f"expected a string, got {value!r}")
        return str(value)
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise _BadValue(f"expected a mapping such as '{{key: value}}', got {value!r}") from None
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _BadValue(f"expected a mapping such as '{{key: value}}', got {value!r}")
        return value
    return value


def _check_choices(field: dataclasses.Field, value):
    choices = field.metadata.get("choices")
    if choices is None or value is None:
        return
    for item in value if isinstance(value, list) else [value]:
        if item not in choices:
            hint = _did_you_mean(str(item), [str(c) for c in choices])
            raise _BadValue(f"expected one of {', '.join(map(str, choices))}, got {item!r}{hint}")


def _did_you_mean(name: str, candidates: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


# --------------------------------------------------------------------------------------------------
# Model locations: a local path that does not exist fails now, not after a Hub request
# --------------------------------------------------------------------------------------------------
def looks_like_local_path(value: str) -> bool:
    """`./x`, `/x`, `~/x`, `..`, or `a/b/...` whose parent folder exists here (a Hub id is `user/name`,
    whose `user/` is rarely a local folder); more than one `/` cannot be a Hub id."""
    if value.startswith((".", "/", "~")) or os.sep != "/" and value.startswith(os.sep):
        return True
    if value.count("/") > 1:
        return True
    parent = Path(value).parent
    return str(parent) not in ("", ".") and parent.is_dir()


def check_model_location(value: str | None) -> str | None:
    """An error message when `value` looks like a local path and nothing is there; None when fine."""
    if not value or not looks_like_local_path(value):
        return None
    path = Path(value).expanduser()
    if path.exists():
        return None
    parent = path.parent
    hint = ""
    if parent.is_dir():
        siblings = [str(parent / p.name) if str(parent) != "." else p.name for p in parent.iterdir()]
        shown = value if not value.startswith("~") else str(path)
        close = difflib.get_close_matches(shown, siblings, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
    else:
        hint = f" (nor its parent folder {str(parent)!r})"
    return f"no such directory or file: {value!r}{hint}"


# --------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------
class _WideRawFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring keeps its layout; a wide help column, so that each flag's help stays one line."""

    def __init__(self, prog):
        # a terminal's width, else 120 columns (pipes, files)
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 120
        super().__init__(prog, max_help_position=40, width=max(width, 80) - 2)


class HelpFormatter(_WideRawFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """For the scripts with a plain argparse parser: the docstring's layout, each option's default."""


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return "''"
    return str(value)


def _metavar(tp, field: dataclasses.Field) -> str:
    choices = field.metadata.get("choices")
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    tp, _ = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        (item,) = typing.get_args(tp)[:1] or (str,)
        name = getattr(_strip_optional(item)[0], "__name__", "X").upper()
        return f"{name},..."
    if tp is dict or origin is dict:
        return "'{KEY: VALUE}'"
    return getattr(tp, "__name__", "VALUE").upper()


def help_order(cls) -> list[dataclasses.Field]:
    """The fields of `cls` as `--help` lists them: in declaration order, those of its root base config
    (the run's output, checkpoints, logging, Hub and precision every script shares, `run_config.RunConfig`)
    last, after what the script is about (model, data, recipe)."""
    bases = [klass for klass in cls.__mro__ if dataclasses.is_dataclass(klass)]
    if len(bases) < 2:
        return list(dataclasses.fields(cls))
    shared = {f.name for f in dataclasses.fields(bases[-1])}
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name not in shared] + [f for f in fields if f.name in shared]


def build_parser(cls, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of the config dataclass `cls`: `--config`, `--debug` and one flag per field."""
    hints = typing.get_type_hints(cls)
    prog = prog or os.path.basename(sys.argv[0]) or cls.__name__
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [--config FILE.yaml] [--FLAG VALUE ...]   (--help lists the flags)",
        description=description or cls.__doc__,
        formatter_class=_WideRawFormatter,
        allow_abbrev=False,
        epilog="Every flag is also a key of the YAML file given with --config; flags override the file. "
        "Booleans: --FLAG alone means true, --FLAG false. Lists: a,b or '[a, b]'. "
        "None (unset): --FLAG none.",
    )
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of config keys (the recipes are in configs/); flags override it")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error instead of its one-line message")
    options = parser.add_argument_group("config (YAML key or flag)")
    for f in help_order(cls):
        tp = hints[f.name]
        text = f.metadata.get("help", "")
        help_line = f"{text} (default: {_default_text(f)})".replace("%", "%%").lstrip()
        kwargs = dict(default=argparse.SUPPRESS, metavar=_metavar(tp, f), help=help_line)
        if _strip_optional(tp)[0] is bool:
            # `--flag` alone means true; `--flag false` works too
            kwargs.update(nargs="?", const="true", metavar="true|false")
        options.add_argument(f"--{f.name}", **kwargs)
    return parser


def _converted(cls, values: dict, where) -> dict:
    """`values` converted to the fields' types and checked against their choices; `where(name)` says
    where a value came from in the error ("configs/x.yaml: key 'seed'", "argument --seed")."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        details = [f"{k!r}{_did_you_mean(k, fields)}" for k in unknown]
        raise ConfigError(f"{where(None)}: unknown key(s): {', '.join(details)}")
    hints = typing.get_type_hints(cls)
    converted = {}
    for name, value in values.items():
        try:
            converted[name] = _convert(hints[name], value)
            _check_choices(fields[name], converted[name])
        except _BadValue as err:
            raise ConfigError(f"{where(name)}: {err}") from None
    return converted


def from_dict(cls, values: dict, source: str = "config"):
    """Build the dataclass `cls` from a mapping (values converted and checked); ConfigError otherwise."""
    return _construct(cls, _converted(cls, values, lambda name: source if name is None else f"{source}: key {name!r}"))


def _construct(cls, kwargs: dict):
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ checks: ranges, combinations
        raise ConfigError(f"invalid config: {err}") from None


def load_yaml(path: str | Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as err:
        raise ConfigError(f"--config {str(path)!r}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def _from_command_line(cls, parser: argparse.ArgumentParser, argv: list[str]):
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        names = [f.name for f in dataclasses.fields(cls)] + ["config", "debug"]
        hints = [_did_you_mean(t[2:].split("=")[0], names, prefix="--") for t in unknown if t.startswith("--")]
        details = " ".join(unknown) + "".join(h for h in hints if h)
        raise ConfigError(f"unrecognized arguments: {details}")
    source = args.config
    from_file = _converted(cls, load_yaml(source) if source else {},
                           lambda name: source if name is None else f"{source}: key {name!r}")
    flags = {name: value for name, value in vars(args).items() if name not in ("config", "debug")}
    from_flags = _converted(cls, flags, lambda name: f"argument --{name}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    merged = {**from_file, **from_flags}
    for name, value in merged.items():
        if fields[name].metadata.get("hub_or_path") and isinstance(value, str):
            problem = check_model_location(value)
            if problem:
                where = f"argument --{name}" if name in from_flags else f"{source}: key {name!r}"
                raise ConfigError(f"{where}: {problem}")
    return _construct(cls, merged)


_PARSED: dict = {}  # (config class, argv) -> config: the command line is parsed once per process


def parse_config(cls, argv: Sequence[str] | None = None, description: str | None = None):
    """`--config FILE.yaml` (optional) then `--field value` overrides for every dataclass field.

    `argv=None` reads `sys.argv[1:]`; its errors print a usage line and exit with status 2 (as
    argparse does), and its result is kept, so that a script can parse before importing torch and
    its `main()` gets the same config back. An explicit `argv` raises ConfigError instead."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if from_sys else argv)
    key = (cls, tuple(argv))
    if from_sys and key in _PARSED:
        return _PARSED[key]
    parser = build_parser(cls, description)
    try:
        cfg = _from_command_line(cls, parser, argv)
    except ConfigError as err:
        if from_sys:
            parser.error(str(err))  # usage + "PROG: error: ...", exit status 2
        raise
    if from_sys:
        _PARSED[key] = cfg
    return cfg


def to_dict(cfg) -> dict:
    """The config as a dict for saving, printing and trackers: secrets (hub_token, ...) masked."""
    from .secrets import mask_secrets

    return mask_secrets(dataclasses.asdict(cfg))


def to_yaml(cfg) -> str:
    """The config as YAML (config.yaml, checkpoints, model cards, stdout): secrets masked."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
