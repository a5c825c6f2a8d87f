"""Loading a config file: `load_config(path, overrides)`, as the command line does it.

`--config=configs/NAME.py[:ARG]` names a file (a shipped one by that path from any directory)
whose `get_config(arg)` returns a ConfigDict; each `key=value` override then changes one key,
and the result is validated.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Sequence

import ml_collections as mc

from jaxllm.config.rules import VALUE_RULES, rule_for
from jaxllm.config.schema import ConfigError
from jaxllm.config.validate import validate


def _import_config_file(path: str):
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"jaxllm_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    return module


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as model.family=llama


def apply_override(config: mc.ConfigDict, override: str) -> None:
    """Applies one "a.b.c=value" override, refusing keys that do not exist."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, text = override.split("=", 1)
    *parents, leaf = parts = key.strip().split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, mc.ConfigDict) or part not in node:
            known = list(node) if isinstance(node, mc.ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + close)!r}?" if close else ""
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}{hint}")
        if i < len(parents):
            node = node[part]
    value = _parse_value(text)
    old = node[leaf]
    if isinstance(old, bool) and text.strip().lower() in ("true", "false"):
        value = text.strip().lower() == "true"  # as absl's --config.KEY=true
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        node[leaf] = value
    except TypeError:  # ConfigDict keeps a key's type: 1.5 for an int key, text for a number
        rule = rule_for(VALUE_RULES, tuple(key.strip().split(".")))
        raise ConfigError(f"config.{key.strip()}: " + ((rule and rule.error(value)) or
                          f"{value!r} is a {type(value).__name__}; it must be a "
                          f"{type(old).__name__}")) from None


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")  # the shipped config files, jaxllm/configs/


def config_path(path: str) -> str:
    """A config file as given; `configs/NAME.py` that is not there is the shipped one
    (jaxllm/configs/NAME.py), so the documented paths work from any directory."""
    parts = os.path.normpath(path).split(os.sep)
    shipped = os.path.join(CONFIGS_DIR, *parts[1:])
    if not os.path.exists(path) and len(parts) > 1 and parts[0] == "configs" and \
            os.path.exists(shipped):
        return shipped
    return path


def load_config(path: str, overrides: Sequence[str] = ()) -> mc.ConfigDict:
    """The same ConfigDict the CLI builds: `path` (see `config_path`) may end in `:ARG` for a
    variant."""
    arg = None
    if ":" in path and not os.path.exists(config_path(path)):
        path, arg = path.split(":", 1)
    path = config_path(path)
    module = _import_config_file(path)
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ValueError as e:  # the config file's own refusal, e.g. an unknown variant
        raise ConfigError(f"--config={path}{'' if arg is None else ':' + arg}: {e}") from None
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config
