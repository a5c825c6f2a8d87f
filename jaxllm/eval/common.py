"""What the evaluation commands share (niah, long_ppl, report): the model-source flags and
loading, model-config overrides (`--settings`), held-out text, progress and the lazy
matplotlib import. Text comes from a source's held-out split (`--data=FORMAT[:PATH]`, by
default the python_stdlib source, which needs no download). Results go to `--out` (default
`<workdir or hf>/eval`) as JSON and PNG; plots need matplotlib (`pip install -e '.[eval]'`),
which neither `import jaxllm` nor training imports.

T tokens per document or prompt, B documents or prompts per batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections as mc
import numpy as np

from jaxllm.config.load import apply_override
from jaxllm.config.schema import ConfigError, data_source, model_defaults
from jaxllm.config.validate import validate_model


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    from jaxllm.config.cli import add_model_source_flags

    add_model_source_flags(parser)
    parser.add_argument("--tokenizer", default="",
                        help="tokenizer name or path, for a params checkpoint without one")
    parser.add_argument("--max_rank", type=int, default=0, help="with --tokenizer: its ranks")
    parser.add_argument("--data", default="python_stdlib",
                        help="held-out text: FORMAT[:PATH] of a data source (formats of "
                             "jaxllm/data/formats.py); default python_stdlib")
    parser.add_argument("--out", default="", help="output folder (default <workdir|hf>/eval)")
    parser.add_argument("--seed", type=int, default=0)


def load(args: argparse.Namespace) -> tuple[mc.ConfigDict, dict, Any]:
    """(model config, params, tokenizer) for the parsed flags, with one clear error for a
    missing or ambiguous model."""
    from jaxllm.convert.load import load_model

    if (args.workdir is None) == (args.hf is None):
        raise ValueError("give exactly one of --workdir and --hf")
    path = args.workdir or args.hf
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--{'workdir' if args.workdir else 'hf'}: {path!r} is not a "
                                "directory")
    if args.tokenizer:  # a params checkpoint (save_params, average) has no tokenizer
        from jaxllm.convert import load_checkpoint
        from jaxllm.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, max_rank=args.max_rank)
        if args.hf:
            from jaxllm.convert import load_hf

            return (*load_hf(args.hf), tokenizer)
        model_config, params, _ = load_checkpoint(args.workdir, args.step)
        return model_config, params, tokenizer
    return load_model(workdir=args.workdir, hf=args.hf, step=args.step)


def out_dir(args: argparse.Namespace) -> str:
    path = args.out or os.path.join(args.workdir or args.hf, "eval")
    os.makedirs(path, exist_ok=True)
    return path


def parse_setting(text: str) -> tuple[str, list[str]]:
    """"name:key=value,key=value" (keys of config.model) → (name, overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise ValueError(f"--settings {text!r}: write NAME:KEY=VALUE,KEY=VALUE (keys of "
                         "config.model), e.g. base: or yarn:rope_scaling.type=yarn,"
                         "rope_scaling.factor=4")
    return name, [part.strip() for part in rest.split(",") if part.strip()]


def apply_setting(model_config: mc.ConfigDict, overrides: Sequence[str], name: str = ""
                  ) -> mc.ConfigDict:
    """A copy of the model config with `overrides` ("rope_theta=1e4", jaxllm.config syntax,
    keys relative to config.model) applied and checked."""
    config = mc.ConfigDict({"model": model_defaults()})
    config.model.update(model_config.to_dict() if hasattr(model_config, "to_dict")
                        else dict(model_config))
    for override in overrides:
        try:
            apply_override(config, f"model.{override}")
        except ConfigError as e:
            raise ConfigError(f"--settings {name}: {override!r}: {e}") from None
    try:
        validate_model(config.model)
    except ConfigError as e:
        raise ConfigError(f"--settings {name}: {e}") from None
    return config.model


def check_length(model_config: mc.ConfigDict, length: int, what: str) -> None:
    """Warns when `length` tokens go past what the model's positions were trained for and no
    rope scaling or dual chunk attention is on."""
    m = model_config
    scaled = m.rope_scaling.type != "none" or m.dca.enabled
    if length > m.max_position_embeddings and not scaled:
        logging.warning("%s: %d tokens exceed model.max_position_embeddings=%d and neither "
                        "rope_scaling nor dca is set: expect quality to fall past it", what,
                        length, m.max_position_embeddings)


def heldout_documents(tokenizer: Any, data: str = "python_stdlib", min_tokens: int = 1,
                      seed: int = 0, max_scan: int = 100_000) -> Iterator[np.ndarray]:
    """Token ids (int32) of held-out documents of `data` ("FORMAT[:PATH]") with at least
    `min_tokens` tokens, in a seeded order, each once."""
    from jaxllm.data.sources import open_source

    fmt, _, path = data.partition(":")
    source = open_source(data_source(fmt, path), "heldout", "eval", seed)
    for i in range(min(len(source), max_scan)):
        raw = source[i]
        ids = raw.ids if hasattr(raw, "ids") else tokenizer.encode(raw.text)
        if len(ids) >= min_tokens:
            yield np.asarray(ids, np.int32)


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (as training's progress)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True)

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note)
        else:
            print(f"{self.desc}: {self.done}/{self.total} {note}".rstrip(), file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; a clear error when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install -e '.[eval]' (or pip install "
                          "matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def run_cli(main_body, argv_parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """Parses flags and runs `main_body(args)`; a user error (or matplotlib missing) is one
    `error:` line, exit 2."""
    from jaxllm.config.cli import run_command

    args = argv_parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # not "Unable to initialize backend"
    run_command(lambda: main_body(args), errors=(ImportError,))
