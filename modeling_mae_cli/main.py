"""How every script ends: expected errors as one line and a non-zero exit, bugs with their traceback.

    if __name__ == "__main__":
        sys.exit(run_main(main))

Expected errors are the ones a user fixes without reading our code: the config (`ConfigError`, exit
status 2 as for any usage error), data, paths and the Hub (`ValueError`, which the project raises for
wrong input with the field, the expected and the actual value; `OSError`, e.g. a missing file or a
full disk; `ExpectedError` for the project's own kinds such as a failed upload; huggingface_hub's
HTTP and offline errors). They print `PROG: error: MESSAGE` and exit with status 1. Anything else
(TypeError, KeyError, torch's RuntimeError, ...) is a bug and keeps its traceback; `--debug` shows the
traceback of every error.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from .config import ConfigError


class ExpectedError(Exception):
    """Base of the project's errors that are about the user's input or environment, not a bug
    (a dataset that cannot be reached, a Hub repo that cannot be written, a diverging loss)."""


def is_expected(err: BaseException) -> bool:
    if isinstance(err, (ValueError, OSError, ExpectedError)):
        return True
    hub_errors = sys.modules.get("huggingface_hub.errors")  # only if loaded: nothing to import here
    if hub_errors is not None:
        kinds = tuple(getattr(hub_errors, n) for n in ("HfHubHTTPError", "OfflineModeIsEnabled") if hasattr(hub_errors, n))
        return isinstance(err, kinds)
    return False


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text if text else type(err).__name__


def run_main(main: Callable, argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; its return value is the exit status (0 when it returns something else)."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    prog = os.path.basename(sys.argv[0]) or "script"
    try:
        result = main(argv)
    except ConfigError as err:
        if debug:
            raise
        print(f"usage: {prog} [--config FILE.yaml] [--FLAG VALUE ...]   (--help lists the flags)", file=sys.stderr)
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug or not is_expected(err):
            raise
        print(f"{prog}: error: {_one_line(err)}  (--debug shows the traceback)", file=sys.stderr)
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
