"""Orbax checkpoints of the train state plus a JSON record (stage, data-iterator state).

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. Restoring reads straight onto the
shardings of an abstract state, so a full copy never sits on one host.
"""

from __future__ import annotations

import os

import jax
import ml_collections as mc
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, config: mc.ConfigDict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep,
            enable_async_checkpointing=bool(config.checkpoint["async"]),
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """`abstract_state`: jax.ShapeDtypeStruct leaves carrying the target shardings."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings) -> object:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
