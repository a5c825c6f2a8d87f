"""jaxllm as a model of EleutherAI's lm-evaluation-harness (`lm-eval`, `pip install -e '.[eval]'`).

    python -m jaxllm.eval.harness --model jaxllm
        --model_args workdir=DIR[,step=N][,mesh=fsdp:2/tensor:2]
        --tasks TASK[,TASK ...] [--limit N] [any other lm_eval flag]
    python -m jaxllm.eval.harness --model jaxllm --model_args hf=HF_DIR --tasks ...

This module registers the model name "jaxllm" and runs lm_eval's own command line; from
Python, `lm_eval.simple_evaluate(model=JaxLLM(...), tasks=[...])` takes an instance. Model
arguments: `workdir` (and `step`) or `hf`, `mesh`, `batch_size` (default 8), `max_length`
(default max_position_embeddings), `max_gen_toks` (default 256), `seed`. Each request type
computes what lm-eval's `hf` model does (tests/unit/eval/test_harness.py). Requests go longest
first, rows padded to a power of two of at least MIN_BUCKET tokens: one program per length bucket.
Design notes: docs/evaluation.md.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  first: lm_eval loads its own models only into an empty registry
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxllm.convert.load import load_model
from jaxllm.model.decode import generate_ids, mesh_of
from jaxllm.model.transformer import apply, frozen
from jaxllm.parallel import sharding
from jaxllm.train.loss import token_losses

MIN_BUCKET = 16  # the shortest padded length: tiny requests share one program
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")  # shipped tasks

log = logging.getLogger(__name__)


def bucket(n: int) -> int:
    """The padded length of a row of n tokens: a power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


@functools.partial(jax.jit, static_argnums=0)
def _token_scores(model_config, params: dict, inputs_BxT: jax.Array, targets_BxT: jax.Array,
                  segment_ids_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each target's log-probability (float32) and whether it is the argmax, both [B, T]."""
    positions_BxT = jnp.broadcast_to(jnp.arange(inputs_BxT.shape[1], dtype=jnp.int32),
                                     inputs_BxT.shape)
    logits_BxTxV = apply(model_config, params, inputs_BxT, positions_BxT, segment_ids_BxT)
    nll_BxT, _ = token_losses(logits_BxTxV, targets_BxT)
    return -nll_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT


@register_model("jaxllm")
class JaxLLM(TemplateLM):
    """An lm-eval model over jaxllm params: from `workdir` / `hf`, or, in the training loop,
    `model=(model_config, params, tokenizer)` with the params where they already are."""

    def __init__(self, workdir: str | None = None, hf: str | None = None,
                 step: int | None = None, mesh: str = "", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0,
                 model: tuple | None = None, **unused: Any):
        super().__init__()
        unused.pop("device", None)  # lm_eval passes its --device (default cuda:0) to every model
        unused.pop("max_batch_size", None)
        if unused:
            raise ValueError(f"jaxllm model_args: unknown {sorted(unused)}; known: workdir, hf, "
                             "step, mesh, batch_size, max_length, max_gen_toks, seed")
        if model is not None:
            self.model_config, self.params, self.tokenizer = model
        else:
            self.model_config, self.params, self.tokenizer = load_model(
                workdir, hf, step, mesh.replace("/", ","))
        self.cfg = frozen(self.model_config)
        self.mesh = mesh_of(self.params)
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or self.cfg.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.truncated = 0  # requests cut from the left to max_length (logged at the end)

    # -- what TemplateLM asks for ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eos_id  # Qwen2's tokenizer has no BOS: lm-eval's hf takes EOS

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Ids to text without special tokens, as the hf model's decode skips them."""
        special = set(self.tokenizer.special_tokens.values())
        return self.tokenizer.decode([i for i in ids if i not in special])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw
                              ) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids)."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))
            if len(whole) > self.max_length + 1:
                self.truncated += 1
                whole = whole[-(self.max_length + 1):]
            rows.append((whole, len(continuation)))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            logp_BxT, greedy_BxT = self._score([rows[i][0] for i in batch])
            for b, i in enumerate(batch):
                whole, n = rows[i]
                span = slice(len(whole) - 1 - n, len(whole) - 1)  # the continuation's targets
                results[i] = (float(logp_BxT[b, span].sum()), bool(greedy_BxT[b, span].all()))
        self._report_truncation()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[r] += logp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # requests with the same generation arguments
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results = [""] * len(requests)
        eos = self.tokenizer.eos_token
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            context_room = self.max_length - max_gen_toks
            if context_room < 1:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a context in "
                                 f"max_length={self.max_length}")
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample") else 0.0
            prompts = []
            for i in indices:
                ids = self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                if len(ids) > context_room:
                    self.truncated += 1
                    ids = ids[-context_room:]
                prompts.append(ids)
            for start in range(0, len(indices), self.batch_size):
                out = generate_ids(
                    self.cfg, self.params, prompts[start:start + self.batch_size], max_gen_toks,
                    eos_id=self.eot_token_id, num_ids=self.tokenizer.vocab_size,
                    temperature=temperature, top_k=int(kwargs.get("top_k", 0) or 0),
                    top_p=float(kwargs.get("top_p", 1.0) or 1.0), seed=self.seed + start)
                for i, ids in zip(indices[start:start + self.batch_size], out, strict=True):
                    results[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
        self._report_truncation()
        return results

    # -- batches -----------------------------------------------------------------------------

    def _score(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Per-target log-probabilities and argmax hits [rows, T − 1] of whole token rows."""
        B = self.batch_size
        if self.mesh is not None:
            B += -B % sharding.batch_ways(self.mesh)
        T = min(bucket(max(len(r) for r in rows) - 1), self.max_length)
        inputs = np.zeros((B, T), np.int32)
        targets = np.zeros((B, T), np.int32)
        segments = np.zeros((B, T), np.int32)
        for b, row in enumerate(rows):
            n = len(row) - 1
            inputs[b, :n], targets[b, :n], segments[b, :n] = row[:-1], row[1:], 1
        run = functools.partial(_token_scores, self.cfg, self.params, inputs, targets, segments)
        if self.mesh is None:
            logp, greedy = run()
        else:
            with sharding.use_mesh(self.mesh):
                logp, greedy = run()
        return sharding.to_host(logp), sharding.to_host(greedy)

    def _report_truncation(self) -> None:
        if self.truncated:
            log.warning("%d requests were longer than max_length=%d and were cut from the left",
                        self.truncated, self.max_length)
            self.truncated = 0


class LoopTasks:
    """`config.eval_tasks` in the training loop (a jaxllm.train.loop.Evaluator): the tasks on
    the live params where they are (the training mesh; no export, no host copy) →
    {"eval/<task>/<metric>": score}. The tasks and their data load once, here, so that an
    unknown task or missing data stops the run before it trains."""

    config_key, prefix = "eval_tasks", "eval/"

    def __init__(self, config):
        from lm_eval.tasks import TaskManager

        names = [t.strip() for t in config.eval_tasks.split(",") if t.strip()]
        self.every, self.limit = int(config.eval_tasks_every), int(config.eval_tasks_limit)
        self.tasks = load_tasks(TaskManager(include_path=TASKS_DIR), names, "config.eval_tasks")

    def for_stage(self, stage):
        def evaluate(params: dict) -> dict[str, float]:
            return task_scores(JaxLLM(model=(stage.model_cfg, params, stage.tokenizer)),
                               self.tasks, self.limit)

        return evaluate


def load_tasks(manager, names: list[str], where: str) -> list:
    """The lm-eval Task / Group objects of task names or YAML paths, with one clear error for
    an unknown name (and the closest known ones) or data that cannot be had offline."""
    from jaxllm.config.schema import ConfigError

    known = set(manager.all_tasks)
    loaded = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            if not os.path.exists(name):
                raise ConfigError(f"{where}: no task file {name!r}")
        elif name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise ConfigError(f"{where}: unknown lm-eval task {name!r}"
                              + (f"; closest: {', '.join(close)}" if close else ""))
        try:
            found = manager.load(name)
        except ConnectionError as e:  # datasets: not cached, and the Hub cannot be reached
            raise ConfigError(f"{where}: the data of task {name!r} is not on this machine and "
                              f"cannot be downloaded ({e}); run it once where it can, or use "
                              f"a task YAML over local files (as {TASKS_DIR})") from None
        inner = {c for children in found["group_map"].values() for c in children}
        groups = [g for g in found["groups"].values() if g.name not in inner]
        in_groups = {t.task_name for g in groups for t in g.get_all_tasks()}
        loaded += groups + [t for n, t in found["tasks"].items() if n not in in_groups]
    return loaded


def task_scores(model: JaxLLM, tasks: list, limit: int = 0) -> dict[str, float]:
    """lm_eval.simple_evaluate of loaded `tasks` → {"eval/<task>/<metric>": score}, a metric
    of a filter other than "none" as <metric>_<filter>."""
    import lm_eval

    results = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit or None,
                                      bootstrap_iters=0)["results"]
    scores = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, selection = key.partition(",")  # "acc,none", "exact_match,strip"
            if isinstance(value, float) and not metric.endswith("_stderr"):
                name = metric if selection in ("", "none") else f"{metric}_{selection}"
                scores[f"eval/{task}/{name}"] = float(value)
    return scores


def _batch_size(value: int | str) -> int:
    """lm_eval passes --batch_size as text ("8", "auto", "auto:4"); auto takes the default."""
    text = str(value)
    if text.startswith("auto"):
        return 8
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size={value!r}: give a positive number of rows")
    return int(text)


def main() -> None:
    """lm_eval's command line, with the "jaxllm" model, the shipped tasks (TASKS_DIR; with
    another --include_path, name them by their YAML paths) and this model's batch of 8 rows
    where no --batch_size is given (lm_eval's own default is 1)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from jaxllm.config.cli import run_command

    given = {a.split("=")[0] for a in sys.argv}
    if "--include_path" not in given:
        sys.argv += ["--include_path", TASKS_DIR]
    evaluates = sys.argv[1:2] not in (["ls"], ["validate"])  # lm_eval's other subcommands
    if evaluates and "--batch_size" not in given and "-b" not in given:
        sys.argv += ["--batch_size", "8"]
    run_command(cli_evaluate)  # a bad model argument or path: one line, not a traceback


if __name__ == "__main__":
    main()
