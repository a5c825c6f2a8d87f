"""Downstream scores of a run against training tokens, one panel per task and metric, with
the stage boundaries marked.

    python -m jaxllm.eval.report --workdir=DIR [--out=PNG]

Reads the `eval/<task>/<metric>` values that `config.eval_tasks` wrote to DIR/metrics.jsonl
(a step logged twice, as a resumed run may, counts once: the last) and the stages of
DIR/config.json; writes DIR/eval/tasks.png (matplotlib, `pip install -e '.[eval]'`) and
prints each stage's last scores.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from jaxllm.eval import common

PREFIX = "eval/"


def stage_tokens(config: dict) -> list[tuple[str, int, int, int]]:
    """(stage, first step, end step, tokens a step) of each stage that trains, in order."""
    out, step = [], 0
    for name, stage in config["stages"].items():
        if stage["steps"]:
            out.append((name, step, step + stage["steps"], stage["batch_size"] * stage["seq_len"]))
            step += stage["steps"]
    return out


def tokens_at(step: int, stages: list[tuple[str, int, int, int]]) -> int:
    """Tokens trained on after `step` steps."""
    return sum(max(0, min(step, end) - start) * per_step for _, start, end, per_step in stages)


def read_scores(workdir: str) -> dict[str, dict[int, float]]:
    """{"<task>/<metric>": {step: value}} of a run's metrics.jsonl."""
    from jaxllm.train.metrics import read_metrics

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir={workdir} has no metrics.jsonl")
    scores: dict[str, dict[int, float]] = {}
    for record in read_metrics(workdir):
        for key, value in record.items():
            if key.startswith(PREFIX) and isinstance(value, int | float):
                scores.setdefault(key.removeprefix(PREFIX), {})[record["step"]] = value
    if not scores:
        raise ValueError(f"{path} has no task scores (eval/<task>/<metric>): train with "
                         "config.eval_tasks set, e.g. --config.eval_tasks=stdlib")
    return scores


def plot(scores: dict[str, dict[int, float]], stages: list[tuple[str, int, int, int]],
         path: str) -> Any:
    """One panel per task/metric: score against tokens (millions), stage ends as dashed
    lines, stage names along the top. Returns the figure."""
    plt = common.pyplot()
    names = sorted(scores)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        steps = sorted(scores[name])
        values = [scores[name][s] for s in steps]
        ax.plot([tokens_at(s, stages) / 1e6 for s in steps], values, marker="o", markersize=3)
        task, _, metric = name.rpartition("/")
        ax.set_title(task, fontsize=9)
        ax.set_ylabel(metric)
        ax.set_xlabel("training tokens (M)")
        if min(values) > 0 and max(values) > 10 * min(values):  # word perplexity, early on
            ax.set_yscale("log")
        for stage, _, end, _ in stages:  # each stage's name just left of its end
            right = tokens_at(end, stages) / 1e6
            ax.axvline(right, color="grey", linestyle="--", linewidth=0.8)
            ax.text(right, 0.03, stage + " ", transform=ax.get_xaxis_transform(), rotation=90,
                    ha="right", va="bottom", fontsize=7, color="grey")
        ax.set_xlim(0, tokens_at(stages[-1][2], stages) / 1e6 * 1.02 if stages else None)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def stage_summary(scores: dict[str, dict[int, float]], stages) -> list[str]:
    """One line per stage: its last scores (those at the latest scored step in it)."""
    lines = []
    for stage, start, end, _ in stages:
        inside = {n: {s: v for s, v in by_step.items() if start < s <= end}
                  for n, by_step in scores.items()}
        last = {n: by_step[max(by_step)] for n, by_step in inside.items() if by_step}
        if last:
            step = max(max(s) for s in inside.values() if s)
            lines.append(f"{stage} (step {step}): "
                         + ", ".join(f"{n}={v:.4g}" for n, v in sorted(last.items())))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="run directory")
    parser.add_argument("--out", default="", help="PNG path (default DIR/eval/tasks.png)")

    def body(args):
        from jaxllm.checkpoint.run_dir import read_run_config

        stages = stage_tokens(read_run_config(args.workdir))
        scores = read_scores(args.workdir)
        path = args.out or os.path.join(args.workdir, "eval", "tasks.png")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        plot(scores, stages, path)
        print("\n".join(stage_summary(scores, stages)))
        print(f"wrote {path}")

    common.run_cli(body, parser, argv)


if __name__ == "__main__":
    main()
