"""Profiles and the persistent compilation cache of a training run.

`config.profile.start` / `.stop` (global steps; stop 0: off) trace the steps in
[start, stop) with `jax.profiler` into `<workdir>/profile/`, on every process: open it with
TensorBoard's profile plugin (`pip install tensorboard-plugin-profile`, then
`tensorboard --logdir <workdir>/profile`) or drop the `.xplane.pb` / `.trace.json.gz` into
https://ui.perfetto.dev. Each step is annotated (`StepTraceAnnotation`), so the trace viewer
shows step boundaries. Pick steps after the first of a stage, which compiles.

`config.compilation_cache_dir` is where XLA keeps compiled programs between runs, so a resumed
or repeated run does not compile again: "auto" uses $JAX_COMPILATION_CACHE_DIR when set, else
~/.cache/jaxllm/xla; "" turns it off.
"""

from __future__ import annotations

import contextlib
import os

import jax
import ml_collections as mc


def compilation_cache_dir(config: mc.ConfigDict) -> str:
    """The folder `config.compilation_cache_dir` names ("" when off)."""
    value = config.compilation_cache_dir
    if value != "auto":
        return value
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxllm", "xla")


def use_compilation_cache(config: mc.ConfigDict) -> None:
    """Points JAX at the run's compilation cache; every compile is cached, however quick
    (a tiny model's steps compile in seconds, which is most of its start)."""
    path = compilation_cache_dir(config)
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


class Profiler:
    """Starts the trace before step `start` and stops it after step `stop` - 1."""

    def __init__(self, config: mc.ConfigDict, workdir: str):
        self.start, self.stop = config.profile.start, config.profile.stop
        self.logdir = os.path.join(workdir, "profile")
        self.active = False

    def step(self, step: int):
        """A context for the step that takes the state from `step` to `step` + 1."""
        if self.stop and not self.active and self.start <= step < self.stop:
            jax.profiler.start_trace(self.logdir)
            self.active = True
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, state) -> None:
        """Call after the step that took the state to `step`: stops once `stop` is reached."""
        if self.active and step >= self.stop:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
