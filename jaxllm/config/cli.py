"""What every `python -m jaxllm.X` command shares: bad input (a flag, a path, a config key,
data) is one `error:` line and exit status 2 (`fail`, `run_command`, `ArgumentParser`); the
model-source flags; and, for the absl commands (main, plan, compile), `--config.KEY=VALUE`
overrides that go through `load_config` as from Python, so that a misspelled key names the
closest one instead of a traceback from flag parsing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags

from jaxllm.config.schema import ConfigError

# What a user's input causes (ConfigError, DataError and TargetError are ValueErrors).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError,
                                                NotADirectoryError)


def fail(message: object, exit: Callable[[int], Any] = sys.exit) -> NoReturn:
    """One `error:` line on stderr, then exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    exit(2)
    raise SystemExit(2)  # (`exit` returned)


def run_command(body: Callable[[], Any], errors: tuple[type[BaseException], ...] = ()) -> Any:
    """`body()`, with a user error (USER_ERRORS and `errors`) turned into `fail`."""
    try:
        return body()
    except (*USER_ERRORS, *errors) as e:
        fail(e)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and exit 2 too (its subcommands'
    parsers are of this class as well)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (--help lists the flags)")


def add_model_source_flags(parser: argparse.ArgumentParser) -> None:
    """--workdir / --hf / --step: where a command reads a model from."""
    parser.add_argument("--workdir", help="run directory (newest checkpoint) or params "
                                          "checkpoint")
    parser.add_argument("--hf", help="Hugging Face directory (Qwen2 / Qwen2-MoE / Llama)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir")


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


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # an unknown flag, a bad value, a missing required flag
        fail(e)


def run_with_overrides(main: Callable[[list[str], list[str]], None]) -> None:
    """absl's `app.run` of `main(argv, overrides)`, the `--config.KEY=VALUE` overrides taken
    out of sys.argv first; a malformed one, a bad flag or a stray argument is one `error:`
    line, exit 2."""
    overrides, argv = run_command(lambda: split_overrides(sys.argv))

    def checked(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}")
        main(argv, overrides)

    app.run(checked, argv=argv, flags_parser=_parse_flags)
