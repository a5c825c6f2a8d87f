"""Attention on a mesh (jaxllm/parallel/blocks.py): every implementation's kernel is traced on
per-device blocks (rows over data×fsdp, query and kv heads over tensor, queries over sequence
with K/V gathered), gives what one device gives, and gradients flow through the shard_map.
Pallas runs interpreted, where XLA could partition it; recording the shapes the kernel is
traced with is what shows that on a GPU or TPU each device would run it on its own block,
not on the gathered batch."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from jaxllm.data import make_iterator
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.kernels import attention as kernel_attention
from jaxllm.model import apply, init_params
from jaxllm.model.decode import generate_ids
from jaxllm.parallel import blocks, sharding
from jaxllm.parallel.sharding import mesh_from_spec
from jaxllm.train.stages import init_train_state, stage_model_config, to_global
from jaxllm.train.step import summed_loss
from tests.helpers.model import small_config
from tests.helpers.runs import mesh_of
from tests.helpers.train import tiny_8_rows

# impl → (module, function) of the kernel that `jaxllm.kernels.attention` dispatches to.
KERNELS = {"xla": ("jaxllm.kernels.attention", "attention_ref"),
           "chunked": ("jaxllm.kernels.attention", "chunked_attention"),
           "pallas": ("jaxllm.kernels.flash_attention", "flash_attention")}


def record_kernel_shapes(monkeypatch, impl: str) -> list:
    """Wraps the kernel of `impl`: each trace appends (q.shape, k.shape, segment_ids.shape)."""
    module = importlib.import_module(KERNELS[impl][0])
    kernel, seen = getattr(module, KERNELS[impl][1]), []

    def recorder(q, k, v, segment_ids=None, *args, **kwargs):
        seen.append((q.shape, k.shape, None if segment_ids is None else segment_ids.shape))
        return kernel(q, k, v, segment_ids, *args, **kwargs)

    monkeypatch.setattr(module, KERNELS[impl][1], recorder)
    return seen



@pytest.fixture(scope="module")
def params():  # made before a test installs its recorder, which would see init's trace
    return init_params(small_config(), jax.random.key(1))


def model_loss_and_grads(params, impl: str, mesh: Mesh | None):
    """Loss and parameter gradients of the small model on packed documents, B=8, T=40."""
    tokens = jax.random.randint(jax.random.key(0), (8, 40), 0, 128)
    positions = jnp.broadcast_to(jnp.arange(40), (8, 40))
    segments = jnp.asarray(np.repeat([[1, 2, 3, 4], [1, 1, 2, 2]] * 4, 10, axis=1), jnp.int32)
    cfg = small_config(attention_impl=impl)
    loss = lambda p: jnp.mean(jnp.sin(apply(cfg, p, tokens, positions, segments)))  # noqa: E731
    run = jax.jit(jax.value_and_grad(loss))
    if mesh is None:
        return jax.device_get(run(params))
    with sharding.use_mesh(mesh):
        return jax.device_get(run(params))


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas"])
def test_kernel_is_traced_on_per_device_blocks(impl, params, monkeypatch):
    """Small model (N=4, K=2, B=8, T=40), forward and backward. No mesh: the kernel sees the
    global arrays. data2×fsdp2×tensor2: B/4 rows, N/2 and K/2 heads. data2×tensor2×sequence2:
    B/2 rows, T/2 queries against all T keys (gathered inside, shifted by the device's offset).
    Loss and gradients equal one device's (1e-5)."""
    seen = record_kernel_shapes(monkeypatch, impl)
    want = model_loss_and_grads(params, impl, None)
    assert set(seen) == {((8, 40, 4, 16), (8, 40, 2, 16), (8, 40))}
    for sizes, rows, queries in (({"data": 2, "fsdp": 2, "tensor": 2}, 2, 40),
                                 ({"data": 2, "tensor": 2, "sequence": 2}, 4, 20)):
        seen.clear()
        got = model_loss_and_grads(params, impl, mesh_of(**sizes))
        assert set(seen) == {((rows, queries, 2, 16), (rows, 40, 1, 16), (rows, queries))}
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     got, want)


def test_size_one_mesh_and_odd_shapes_call_the_kernel_directly(params, monkeypatch):
    """A mesh of size-1 axes adds no shard_map; heads the tensor axis does not divide stay
    whole (rows still split), and the result is unchanged."""
    assert blocks.attention_split(mesh_of(), 8, 40, 40, 4, 2, causal=True) is None
    seen = record_kernel_shapes(monkeypatch, "chunked")
    want = model_loss_and_grads(params, "chunked", None)
    seen.clear()
    model_loss_and_grads(params, "chunked", mesh_of())
    assert set(seen) == {((8, 40, 4, 16), (8, 40, 2, 16), (8, 40))}
    seen.clear()
    got = model_loss_and_grads(params, "chunked", mesh_of(data=2, tensor=4))  # K=2 over tensor=4
    assert set(seen) == {((4, 40, 4, 16), (4, 40, 2, 16), (4, 40))}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def train_loss_and_grads(config, devices, record=lambda: None):
    """The train step's loss and gradients (jaxllm.train.step.summed_loss) on the first
    pretrain batch, with the state initialised sharded over `devices` as training does;
    `record` is called after init, before the step is traced."""
    mesh = sharding.make_mesh(config, devices)
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    model_cfg = stage_model_config(config, "pretrain")
    order = blocks.row_order(mesh, config.stages.pretrain.seq_len)  # as the loop does
    with sharding.use_mesh(mesh):
        state, _ = init_train_state(config, mesh)
        batch = to_global(next(make_iterator(config, "pretrain", tokenizer)),
                          sharding.batch_sharding(mesh), order)
        record()
        grad_fn = jax.grad(lambda p, b: summed_loss(p, model_cfg, b, 0.0), has_aux=True)
        grads, (nll, count, _) = jax.jit(blocks.traced_in_row_order(grad_fn, order))(
            state.params, batch)
        return float(nll / count), jax.device_get(grads)


def ring_blocks(B: int, Tl: int, N: int, K: int) -> set:
    """(q, k) shapes of ring attention's kernel calls: its own two chunks causally, then
    chunk against chunk of another device's."""
    c = Tl // 2
    return {((B, Tl, N, 16), (B, Tl, K, 16)), ((B, c, N, 16), (B, c, K, 16))}


@pytest.mark.parametrize("impl, axes, seq_len, blocks", [
    ("pallas", ("data", "tensor", "fsdp"), 32, {((2, 32, 2, 16), (2, 32, 1, 16))}),
    ("chunked", ("data", "tensor", "fsdp"), 32, {((2, 32, 2, 16), (2, 32, 1, 16))}),
    ("pallas", ("data", "tensor", "sequence"), 32, ring_blocks(4, 16, 2, 1)),
    ("chunked", ("data", "tensor", "sequence"), 32, ring_blocks(4, 16, 2, 1)),
    ("chunked", ("data", "sequence", "sequence"), 4096, ring_blocks(1, 1024, 4, 2)),
], ids=["pallas-fsdp", "chunked-fsdp", "pallas-sequence", "chunked-sequence",
        "chunked-sequence4-4096"])
def test_sharded_train_step_equals_one_device(impl, axes, seq_len, blocks, monkeypatch):
    """tiny:smoke (B=8, T=32, N=4, K=2) on data2×tensor2×(fsdp2 or sequence2), and B=2 rows
    of 4,096 packed tokens on data2×sequence4, vs one device: the kernel runs on per-device
    blocks (under sequence, ring attention's, on rows in the zigzag layout as the train loop
    lays them out) and the loss and every gradient match (1e-5)."""
    sizes = {axis: axes.count(axis) * 2 for axis in axes}
    rows = [] if seq_len == 32 else ["stages.pretrain.batch_size=2"]
    common = [f"model.attention_impl={impl}", f"stages.pretrain.seq_len={seq_len}", *rows]
    config = tiny_8_rows(*common, *(f"mesh.{axis}={n}" for axis, n in sizes.items()))
    seen = {}
    loss, grads = train_loss_and_grads(
        config, jax.devices(), lambda: seen.update(shapes=record_kernel_shapes(monkeypatch, impl)))
    assert {(q, k) for q, k, _ in seen["shapes"]} == blocks
    want_loss, want_grads = train_loss_and_grads(tiny_8_rows(*common), jax.devices()[:1])
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    if seq_len == 32:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     grads, want_grads)
    else:  # sums over 8,192 tokens in another order: 1e-5 of each leaf's largest value
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a / np.abs(b).max(), b / np.abs(b).max(), atol=1e-5), grads, want_grads)


def test_sharded_decoding_runs_the_kernels_per_shard(params, monkeypatch):
    """generate on fsdp4×tensor2, 3 prompts padded to 4 rows: the Pallas prefill and every
    decode step see one row, N/2 query and K/2 kv heads per device, and the tokens are those
    of one device (random weights: a wrong head or row would change the argmax)."""
    cfg = small_config(attention_impl="pallas", max_position_embeddings=64)
    prompts = [[5, 9, 2, 7, 1], [3] * 11, [8]]
    prefill, step = record_kernel_shapes(monkeypatch, "pallas"), record_kernel_shapes(
        monkeypatch, "xla")
    sharded = generate_ids(cfg, params, prompts, 6, mesh=mesh_from_spec(cfg, "fsdp:4,tensor:2"))
    # Prompts are padded to 16; the 1-token trace is generate's eval_shape of init, no mesh.
    assert set(prefill) == {((1, 16, 2, 16), (1, 16, 1, 16), (1, 16)),
                            ((1, 1, 4, 16), (1, 1, 2, 16), (1, 1))}
    assert {(q, k) for q, k, _ in step} == {((1, 1, 2, 16), (1, 16 + 6, 1, 16))}
    assert sharded == generate_ids(cfg, params, prompts, 6)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_wrapper_on_auto_and_explicit_meshes(axis_type):
    """The wrapper alone, outside jit, with the log-sum-exp too: on jax.make_mesh's default
    (Explicit) axes the operands are resharded onto the blocks; results equal the kernel's."""
    q, k, v = (jax.random.normal(key, (4, 24, n, 16)) for key, n in
               zip(jax.random.split(jax.random.key(2), 3), (4, 2, 2), strict=True))
    want = kernel_attention(q, k, v, impl="chunked", return_lse=True)
    mesh = jax.make_mesh((2, 2, 2, 1, 1), sharding.MESH_AXES, axis_types=(axis_type,) * 5)
    with jax.set_mesh(mesh):
        out, lse = blocks.attention(q, k, v, impl="chunked", return_lse=True)
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 (out, lse), want)


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas"])
def test_sequence_split_matches_one_device(impl):
    """data2×sequence4, T=40: each device's 10 queries against the gathered keys, shifted to
    its causal offset. With and without segment ids (padding segment 0 included), with a
    local window, the log-sum-exp too: values and gradients equal the kernel's (1e-5)."""
    q, k, v = (jax.random.normal(key, (4, 40, n, 16)) for key, n in
               zip(jax.random.split(jax.random.key(3), 3), (4, 2, 2), strict=True))
    segments = jnp.asarray(np.repeat([[1, 2, 3, 4], [0, 0, 2, 2]] * 2, 10, axis=1), jnp.int32)

    def loss_and_grads(attention, segment_ids, window):
        def loss(q, k, v):
            out, lse = attention(q, k, v, segment_ids, impl=impl, local_window=window,
                                 return_lse=True)
            return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for segment_ids, window in ((segments, None), (None, 13)):
        want = loss_and_grads(kernel_attention, segment_ids, window)
        with jax.set_mesh(mesh_of(data=2, sequence=4)):
            got = loss_and_grads(blocks.attention, segment_ids, window)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     got, want)
