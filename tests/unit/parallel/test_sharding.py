"""Sharded training equals one device; the sharding of a real config is pinned; bad meshes."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from jaxllm.config.load import load_config
from jaxllm.config.schema import ConfigError
from jaxllm.model import abstract_params
from jaxllm.parallel import sharding
from jaxllm.train.stages import init_train_state
from tests.helpers.runs import ROOT
from tests.helpers.train import tiny_8_rows, train


def train_losses(config, devices, steps=5):
    return np.asarray([r["loss"] for r in train(config, devices, steps)[0]])


@pytest.fixture(scope="module")
def one_device_losses():
    return train_losses(tiny_8_rows(), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [
    {"data": 8}, {"data": 1, "fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 1, "fsdp": 4, "tensor": 2},
], ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_sharded_training_equals_one_device(mesh, one_device_losses):
    config = tiny_8_rows(*(f"mesh.{k}={v}" for k, v in mesh.items()))
    losses = train_losses(config, jax.devices())
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-5, atol=1e-5)


def test_params_are_sharded_not_replicated():
    config = tiny_8_rows("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2")
    mesh = sharding.make_mesh(config)
    with sharding.use_mesh(mesh):
        state, _ = init_train_state(config, mesh)
    q = state.params["layers"]["attn"]["q_proj"]["kernel"]  # [L, D, N, H]
    assert q.sharding.spec == PartitionSpec(None, FS, "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 64 // 4, 4 // 2, 16)
    mu = state.opt_state[1].mu["layers"]["attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == q.sharding.spec  # Adam moments shard like their params


FS = ("fsdp", "sequence")  # weights' D splits over both (sequence is 1 here)
QWEN2_7B_SPECS = {  # fsdp=4 × tensor=2: pin it so an accidental change of sharding shows
    ("embed", "embedding"): ("tensor", FS),
    ("final_norm", "scale"): (None,),
    ("lm_head", "kernel"): (FS, "tensor"),
    ("layers", "attn_norm", "scale"): (None, None),
    ("layers", "mlp_norm", "scale"): (None, None),
    ("layers", "attn", "q_proj", "kernel"): (None, FS, "tensor", None),
    ("layers", "attn", "q_proj", "bias"): (None, "tensor", None),
    ("layers", "attn", "k_proj", "kernel"): (None, FS, "tensor", None),
    ("layers", "attn", "k_proj", "bias"): (None, "tensor", None),
    ("layers", "attn", "v_proj", "kernel"): (None, FS, "tensor", None),
    ("layers", "attn", "v_proj", "bias"): (None, "tensor", None),
    ("layers", "attn", "o_proj", "kernel"): (None, "tensor", None, FS),
    ("layers", "mlp", "gate_proj", "kernel"): (None, FS, "tensor"),
    ("layers", "mlp", "up_proj", "kernel"): (None, FS, "tensor"),
    ("layers", "mlp", "down_proj", "kernel"): (None, "tensor", FS),
}


def test_qwen2_7b_shardings_are_pinned():
    config = load_config(os.path.join(ROOT, "jaxllm", "configs", "qwen2_7b.py"))
    mesh = AbstractMesh((1, 4, 2, 1, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 5)
    specs = sharding.param_shardings(abstract_params(config.model), mesh)
    flat = {tuple(k.key for k in path): tuple(s.spec)
            for path, s in jax.tree_util.tree_flatten_with_path(specs)[0]}
    # PartitionSpec drops trailing Nones: pad to the pinned rank before comparing.
    padded = {k: v + (None,) * (len(QWEN2_7B_SPECS.get(k, v)) - len(v)) for k, v in flat.items()}
    assert padded == QWEN2_7B_SPECS


@pytest.mark.parametrize("override, devices, key", [
    ("mesh.tensor=3", 6, "config.model.num_heads=4"),
    ("mesh.tensor=4", 8, "config.model.num_kv_heads=2"),
    ("mesh.fsdp=3", 6, "config.model.hidden_size=64"),
    ("mesh.tensor=3", 8, "config.mesh"),
])
def test_mesh_that_does_not_divide_is_refused(override, devices, key):
    config = tiny_8_rows("mesh.data=-1", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        sharding.make_mesh(config, jax.devices()[:devices])
