"""Orbax checkpoints of a training run: the train state plus a JSON record (stage, data-iterator
state), in `<workdir>/checkpoints/<step>/{state,meta}`.

Orbax marks a step finished (on a local disk: by renaming its temporary directory; elsewhere,
or in other Orbax versions: by a commit_success.txt file), and lists only finished steps. A
step that cannot be used is moved aside, never deleted, so that it is never taken for the
newest again and the run can save that step afresh (Orbax refuses to save a step it lists):
`<step>.unreadable` when restoring it fails (disk trouble, a truncated copy), with a warning,
and the one before it is used; `<step>.unfinished` when a directory has a step's name but
Orbax does not list it. A name taken already gets `-1`, `-2`, ... The newest
`checkpoint.keep` steps are kept, and each stage's last step for good. Restoring reads straight
onto the shardings of an abstract state, so a full copy never sits on one host and the mesh
may differ from the one that saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Iterable

import jax
import ml_collections as mc
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies


class Checkpointer:
    def __init__(self, workdir: str, config: mc.ConfigDict, keep_steps: Iterable[int] = ()):
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(config.checkpoint.keep), policies.CustomSteps(list(keep_steps))])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=bool(config.checkpoint["async"]),
            create=True,
        )
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Returns once the state is copied to host memory; the write goes on behind."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """`abstract_state`: jax.ShapeDtypeStruct leaves carrying the target shardings."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_latest(self, abstract_state, below: int | None = None
                       ) -> tuple[object, dict] | None:
        """The newest readable checkpoint (before step `below`, if given), or None when there
        is none. First moves aside the unfinished steps, then, with a warning, the newer ones
        that cannot be read. If none can be read, that is more likely a cause they share (the
        train state's code changed, the disk is gone) than damage to each: a RuntimeError, and
        nothing is moved, rather than a run that starts again from step 0."""
        self.manager.wait_until_finished()  # a step still being written is neither
        self._set_aside_unfinished()
        failed: dict[int, str] = {}
        for step in reversed(self.steps()):
            if below is not None and step >= below:
                continue
            restored, why = self._try_restore(step, abstract_state)
            # Every process must go on from the same step, even if only some failed to read.
            if not _on_any_process(why is not None):
                if failed:
                    self._set_aside(failed, "unreadable", f"using step {step}")
                return restored
            failed[step] = why or "cannot be restored on another process"
        if failed:
            newest = max(failed)
            raise RuntimeError(
                f"none of the checkpoints {sorted(failed)} in {self.directory} can be restored; "
                f"step {newest} {failed[newest]}. If the code of the train state changed, "
                "resume with the code that saved them; if they are damaged, move them out of "
                "checkpoints/ to start from step 0")
        return None

    def _try_restore(self, step: int, abstract_state) -> tuple[tuple[object, dict] | None,
                                                                 str | None]:
        """(restored, None), or (None, why it cannot be restored, in one short line)."""
        try:
            with _draining_event_loops():
                return self.restore(step, abstract_state), None
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is set aside
            return None, f"cannot be restored ({_first_line(e)})"

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _set_aside_unfinished(self) -> None:
        """Moves aside the directories with a step's name that Orbax does not list (no commit
        marker: a save that never finished). Orbax 0.12 deletes one when it saves that step;
        a version that does not would refuse to save it."""
        unlisted = {}
        if jax.process_index() == 0:
            self.manager.reload()  # its cached list may predate what is on disk
            listed = set(self.manager.all_steps())
            unlisted = {int(n): "is not a finished checkpoint (Orbax does not list it)"
                        for n in sorted(os.listdir(self.directory))
                        if _STEP_NAME.fullmatch(n) and int(n) not in listed}
        self._set_aside(unlisted, "unfinished", "that step will be saved again")

    def _set_aside(self, steps: dict[int, str], suffix: str, then: str) -> None:
        """Renames each step directory (step → why it goes) to `<step>.<suffix>`, on process 0
        only; then every process re-reads the step list, which Orbax caches."""
        for step, why in steps.items():
            path = os.path.join(self.directory, str(step))
            if jax.process_index() == 0:
                moved = _free_name(f"{path}.{suffix}")
                os.rename(path, moved)
            else:
                moved = f"{path}.{suffix}[-N] (process 0 renames it)"
            logging.warning("checkpoint %s %s; moved it to %s, kept for inspection; %s",
                            path, why, moved, then)
        if jax.process_count() > 1:  # the others wait for the renames before they look
            multihost_utils.sync_global_devices(f"jaxllm set aside {suffix}")
        self.manager.reload()
        if still := set(steps) & set(self.manager.all_steps()):
            raise RuntimeError(f"Orbax still lists steps {sorted(still)} of {self.directory} "
                               f"after they were moved to <step>.{suffix}")


# The names Orbax gives steps (no prefix, no zero padding): other entries are not steps.
_STEP_NAME = re.compile(r"0|[1-9][0-9]*")


def _free_name(path: str) -> str:
    """`path`, or `path-1`, `path-2`, ... whichever does not exist yet."""
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that lets its pending tasks finish (for a minute at most: a read that
    hangs must not hang the run) before it closes."""

    def close(self) -> None:
        if not self.is_closed() and (pending := asyncio.all_tasks(self)):
            finished = asyncio.gather(*pending, return_exceptions=True)
            self.run_until_complete(asyncio.wait([finished], timeout=60))
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingLoop()


@contextlib.contextmanager
def _draining_event_loops():
    """Orbax restores in a fresh event loop and closes it as soon as one array fails to read,
    with the reads of the others still going: each then prints its error (from TensorStore's
    threads, and at exit), hundreds of lines in all. Here they finish first."""
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(policy)


def _first_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line` of the error's root cause, at most `limit` characters. TensorStore's
    own error says only which index failed and then prints the array's whole spec (60 lines);
    its cause names the array, the file and what is wrong with it."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    text = type(error).__name__ + (f": {lines[0]}" if lines else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _on_any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def abstract_like(tree, shardings) -> object:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
