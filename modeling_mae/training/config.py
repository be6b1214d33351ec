"""One typed config per script: a dataclass filled from a YAML file, then command-line overrides.

The implementation lives in `modeling_mae_cli.config` (standard library and PyYAML only), so that the
scripts can parse their command line before torch is imported; it is re-exported here for code that
already runs with torch loaded. `to_yaml(cfg)` / `to_dict(cfg)` serialise a config with its secrets
masked (`modeling_mae_cli.secrets`).
"""

from modeling_mae_cli.config import (  # noqa: F401
    ConfigError,
    build_parser,
    check_model_location,
    from_dict,
    load_yaml,
    option,
    parse_config,
    to_dict,
    to_yaml,
)
