"""Command-line plumbing shared by `python -m jaxllm.main` and `python -m jaxllm.plan`: their
`--config.KEY=VALUE` overrides go through `load_config`, as from Python, so that a misspelled
key is one `error:` line with the closest key, not a traceback from flag parsing."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app

from jaxllm.config import ConfigError


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(["KEY=VALUE", ...] of every `--config.KEY=VALUE` or `--config.KEY VALUE` in a command
    line, the other arguments)."""
    overrides, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
        elif arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                value = next(args, None)
                if value is None or value.startswith("--"):
                    raise ConfigError(f"{arg}: give a value, as --config.{key}=VALUE")
            overrides.append(f"{key}={value}")
        else:
            rest.append(arg)
    return overrides, rest


def run_with_overrides(main: Callable[[list[str], list[str]], None]) -> None:
    """absl's `app.run` of `main(argv, overrides)`, the `--config.KEY=VALUE` overrides taken
    out of sys.argv first (one malformed: an `error:` line, exit 2)."""
    try:
        overrides, argv = split_overrides(sys.argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(lambda argv: main(argv, overrides), argv=argv)
