"""The scripts' command line: typed configs from YAML + flags, `--help`, usage errors, the exit path.

This package imports only the standard library and PyYAML. It is separate from `modeling_mae` because
`import modeling_mae` registers the models with transformers' Auto classes, which imports torch
(seconds): a script parses its command line with this package first, so that `--help` and usage
errors answer at once, and imports torch, transformers and datasets afterwards.

    from modeling_mae_cli import option, parse_config, run_main
"""

from .config import (
    ConfigError,
    HelpFormatter,
    build_parser,
    check_model_location,
    option,
    parse_config,
    to_dict,
    to_yaml,
)
from .main import ExpectedError, is_expected, run_main


__all__ = [
    "ConfigError",
    "ExpectedError",
    "HelpFormatter",
    "build_parser",
    "check_model_location",
    "is_expected",
    "option",
    "parse_config",
    "run_main",
    "to_dict",
    "to_yaml",
]
