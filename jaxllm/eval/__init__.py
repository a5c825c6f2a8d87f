"""Evaluation: long context (niah.py, long_ppl.py), downstream tasks through
lm-evaluation-harness (harness.py, tasks/), the scores-against-tokens plot (report.py), their
shared command-line parts (common.py), and the evaluators the training loop is handed
(`loop_evaluators`)."""

from __future__ import annotations

import ml_collections as mc

from jaxllm.config.schema import ConfigError


def loop_evaluators(config: mc.ConfigDict) -> list:
    """The evaluators that `config` asks the training loop to run (jaxllm.train.loop.Evaluator):
    long_ppl in the long_context stage (`eval_long_every`), lm-eval tasks (`eval_tasks`)."""
    evaluators = []
    if config.eval_long_every:
        from jaxllm.eval.long_ppl import LongPplEvaluator

        evaluators.append(LongPplEvaluator(config))
    if config.eval_tasks:
        try:
            from jaxllm.eval.harness import LoopTasks  # needs lm-eval: only when asked for
        except ModuleNotFoundError as e:
            if e.name != "lm_eval" and not (e.name or "").startswith("lm_eval."):
                raise
            raise ConfigError("config.eval_tasks needs lm-evaluation-harness: pip install -e "
                              "'.[eval]' (or pip install lm-eval==0.4.13)") from None
        evaluators.append(LoopTasks(config))
    return evaluators
