"""The MoE dispatch (jaxllm/parallel/experts.py) against the per-expert loop, on CPU.

One tiny layer: B=8, T=8, D=16, E=8, K=2, F=24, float32, tolerance 1e-5. Routing comes from a
random router with experts 3 and 6 made unreachable, so two groups are always empty. Capacity
rules are checked against a count done by hand in Python; on 8 fake devices the sharded
dispatch (all-to-all over `expert`, F over `tensor`) gives one device's values and gradients,
and recording what `gmm` / `batched_ffn` are traced with shows each device's own block.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.parallel import experts, sharding
from tests.helpers.runs import mesh_of

B, T, D, E, K, F = 8, 8, 16, 8, 2, 24
EMPTY = (3, 6)  # experts no token reaches
AXES = {"x": ("batch", "length", "act_embed"), "gate": ("expert", "embed", "expert_mlp"),
        "up": ("expert", "embed", "expert_mlp"), "down": ("expert", "expert_mlp", "embed")}


def close(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def _inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    params = {"x": jax.random.normal(ks[0], (B, T, D)),
              "gate": jax.random.normal(ks[1], (E, D, F)) / 4,
              "up": jax.random.normal(ks[2], (E, D, F)) / 4,
              "down": jax.random.normal(ks[3], (E, F, D)) / 5}
    router_DxE = jax.random.normal(ks[4], (D, E)).at[:, EMPTY].set(0.0)
    bias_E = jnp.zeros(E).at[jnp.asarray(EMPTY)].set(-1e4)
    return params, router_DxE, bias_E, jax.random.normal(ks[5], (B, T, D))


PARAMS, ROUTER, BIAS, COTANGENT = _inputs()


def routing(x_BxTxD):
    return experts.route(x_BxTxD @ ROUTER + BIAS, K, True)[1:]


def direct_loss(ffn, impl, cf):
    """⟨y, cotangent⟩ with weights and experts as arguments: gradients reach the weights."""
    def loss(p, weights_BxTxK, experts_BxTxK):
        y, dropped = ffn(p["x"], weights_BxTxK, experts_BxTxK, p["gate"], p["up"], p["down"],
                         impl=impl, capacity_factor=cf)
        return jnp.sum(y * COTANGENT), (y, dropped)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def test_route_matches_softmax_and_top_k():
    """float32 softmax of the logits, the top-k by value with ties to the lower index (logits
    rounded so ties occur), renormalised or not."""
    logits = np.round(np.asarray(jax.random.normal(jax.random.key(1), (3, 5, E))), 1)
    logits[0, 0, :4] = 0.5  # a four-way tie
    logits = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32)  # bfloat16 in, exactly
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want_e = np.argsort(-p, axis=-1, kind="stable")[..., :K]
    want_w = np.take_along_axis(p, want_e, -1)
    for norm in (False, True):
        probs, w, e = experts.route(jnp.asarray(logits, jnp.bfloat16), K, norm)
        assert probs.dtype == w.dtype == jnp.float32 and e.dtype == jnp.int32
        np.testing.assert_allclose(probs, p, rtol=1e-6)
        np.testing.assert_array_equal(e, want_e)
        np.testing.assert_allclose(w, want_w / want_w.sum(-1, keepdims=True) if norm else want_w,
                                   rtol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_dropless_matches_per_expert_loop(impl):
    """Sorted copies through gmm == the masked loop over experts: y and the gradients of x,
    the routing weights and the three expert weights; experts 3 and 6 get no copies."""
    weights, chosen = routing(PARAMS["x"])
    assert not np.isin(np.asarray(chosen), EMPTY).any()
    (_, (y, dropped)), grads = direct_loss(experts.experts_ffn, impl, 0.0)(PARAMS, weights, chosen)
    (_, (y_ref, dropped_ref)), grads_ref = direct_loss(experts.experts_ffn_ref, impl, 0.0)(
        PARAMS, weights, chosen)
    assert int(dropped) == int(dropped_ref) == 0
    close((y, grads), (y_ref, grads_ref))


def kept_by_hand(chosen_NxK: np.ndarray, cf: float) -> np.ndarray:
    """The capacity rule in plain Python: first choices in token order, then second ones."""
    N = chosen_NxK.shape[0]
    C, load, kept = math.ceil(cf * N * K / E), [0] * E, np.zeros((N, K), bool)
    for k in range(K):
        for n in range(N):
            kept[n, k] = load[chosen_NxK[n, k]] < C
            load[chosen_NxK[n, k]] += 1
    return kept


@pytest.mark.parametrize("cf", [E / K, 0.5], ids=["room_for_all", "small"])
def test_capacity_matches_rule_by_hand(cf):
    """Room for every copy: nothing dropped, values and gradients equal the loop's. Half the
    average load: the dropped count is the hand count, y equals the dropless loop with the
    dropped copies' weights zeroed, and values and gradients equal the loop's with the rule."""
    weights, chosen = routing(PARAMS["x"])
    kept = kept_by_hand(np.asarray(chosen).reshape(-1, K), cf).reshape(B, T, K)
    (_, (y, dropped)), grads = direct_loss(experts.experts_ffn, "auto", cf)(PARAMS, weights, chosen)
    (_, (y_ref, dropped_ref)), grads_ref = direct_loss(experts.experts_ffn_ref, "auto", cf)(
        PARAMS, weights, chosen)
    assert int(dropped) == int(dropped_ref) == np.sum(~kept)
    assert (np.sum(~kept) == 0) == (cf == E / K)
    close((y, grads), (y_ref, grads_ref))
    (_, (y_kept, _)), _ = direct_loss(experts.experts_ffn_ref, "auto", 0.0)(
        PARAMS, jnp.where(kept, weights, 0.0), chosen)
    close(y, y_kept)


# --- on a mesh of 8 fake CPU devices ------------------------------------------------------



def record(monkeypatch, name: str) -> list:
    """Wraps experts.`name` (gmm or batched_ffn): each trace appends its operands' shapes."""
    fn, seen = getattr(experts, name), []

    def recorder(*args, **kwargs):
        seen.append(tuple(a.shape for a in args[:2]))
        return fn(*args, **kwargs)

    monkeypatch.setattr(experts, name, recorder)
    return seen


def layer(impl: str, cf: float):
    """x → routing → experts_ffn → Σ y², differentiated w.r.t. x and the expert weights."""
    def loss(p):
        weights, chosen = routing(p["x"])
        y, dropped = experts.experts_ffn(p["x"], weights, chosen, p["gate"], p["up"], p["down"],
                                         impl=impl, capacity_factor=cf)
        return jnp.sum(jnp.square(y)), (y, dropped)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def on_mesh(fn, mesh: Mesh):
    """fn(params placed by their logical shardings), traced under the mesh and its logical
    axes, and its compiled HLO text."""
    with sharding.use_mesh(mesh):
        placed = {k: jax.device_put(v, NamedSharding(mesh, nn.logical_to_mesh_axes(AXES[k])))
                  for k, v in PARAMS.items()}
        return jax.device_get(fn(placed)), fn.lower(placed).compile().as_text()


MESHES = {"expert4_data2": (dict(expert=4, data=2), 2, F, 4),  # (sizes, El, F/t, ep)
          "expert2_fsdp2_tensor2": (dict(expert=2, fsdp=2, tensor=2), 4, F // 2, 2)}


@pytest.mark.parametrize("mesh_name", MESHES)
def test_dropless_on_mesh_equals_one_device(mesh_name, monkeypatch):
    """Pallas gmm, sharded: each device sorts its B·T/8 or /4 tokens' copies, the gmm sees its
    El experts (F/t of each) on the [ep · M, D] rows received by all-to-all; loss, y and the
    gradients of x and the expert weights equal one device's."""
    sizes, El, Ft, ep = MESHES[mesh_name]
    want = jax.device_get(layer("pallas", 0.0)(PARAMS))
    seen = record(monkeypatch, "gmm")
    got, hlo = on_mesh(layer("pallas", 0.0), mesh_of(**sizes))
    M = B * T * K // math.prod(sizes[a] for a in sharding.BATCH_AXES if a in sizes)
    assert set(seen) == {((ep * M, D), (El, D, Ft)), ((ep * M, Ft), (El, Ft, D))}
    assert "all-to-all" in hlo
    close(got, want)


def test_capacity_on_mesh_counts_each_devices_drops():
    """expert4×data2, one row per device. Room for all: equals one device (values and
    gradients). Small capacity (the rule applies to each device's 8 tokens): y equals the loop
    run row by row, and `dropped` is the sum of the rows' hand counts on every device."""
    mesh = mesh_of(expert=4, data=2)
    got, hlo = on_mesh(layer("auto", E / K), mesh)
    assert "all-to-all" in hlo
    close(got, jax.device_get(layer("auto", E / K)(PARAMS)))
    (_, (y, dropped)), _ = on_mesh(layer("auto", 0.5), mesh)[0]
    weights, chosen = routing(PARAMS["x"])
    rows = [experts.experts_ffn_ref(PARAMS["x"][b:b + 1], weights[b:b + 1], chosen[b:b + 1],
                                    PARAMS["gate"], PARAMS["up"], PARAMS["down"],
                                    capacity_factor=0.5)[0] for b in range(B)]
    close(y, jnp.concatenate(rows))
    by_hand = sum(np.sum(~kept_by_hand(np.asarray(chosen[b]), 0.5)) for b in range(B))
    assert by_hand > 0 and int(dropped) == by_hand


def test_capacity_slots_are_per_device_blocks(monkeypatch):
    """The einsum sees [El, ep · C, D]: each device's E/ep experts, C slots from every
    source (8 tokens per device, C = ceil(4 · 8 · 2 / 8) = 8)."""
    seen = record(monkeypatch, "batched_ffn")
    with sharding.use_mesh(mesh_of(expert=4, data=2)):
        jax.eval_shape(layer("auto", E / K), PARAMS)
    assert set(seen) == {((2, 4 * 8, D), (2, D, F))}


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """jax.lax.ragged_all_to_all as its docstring defines it, from all_gathers (XLA:CPU has
    no ragged-all-to-all): source i's rows input_offsets[i][me] + j land at row
    output_offsets[i][me] + j of `output`, for j < recv_sizes[i] (which must equal what i
    sends: rows past a short send_sizes come out 0, so a mismatch shows)."""
    me = jax.lax.axis_index(axis_name)
    gathered = [jax.lax.all_gather(a, axis_name) for a in
                (operand, input_offsets, send_sizes, output_offsets)]
    rows = jnp.arange(output.shape[0])
    for i in range(gathered[0].shape[0]):
        op, start, size, at = (g[i] for g in gathered)
        j = rows - at[me]
        take = (j >= 0) & (j < recv_sizes[i])
        source = jnp.clip(start[me] + j, 0, op.shape[0] - 1)
        output = jnp.where(take[:, None], jnp.where((j < size[me])[:, None], op[source], 0),
                           output)
    return output


def test_ragged_exchange_of_gpu_and_tpu(monkeypatch):
    """The exchange GPU and TPU take: lowered, fwd+bwd has the ragged all-to-alls (XLA:CPU
    cannot compile them); run with the collective emulated by its documented semantics, the
    offsets and sizes given give one device's values and gradients (expert4×data2)."""
    monkeypatch.setattr(experts, "EXCHANGE", "ragged")
    mesh = mesh_of(expert=4, data=2)
    with sharding.use_mesh(mesh):
        text = layer("xla", 0.0).lower(PARAMS).as_text()
    assert text.count("ragged_all_to_all") == 4
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    got, _ = on_mesh(layer("xla", 0.0), mesh)
    close(got, jax.device_get(layer("xla", 0.0)(PARAMS)))


def test_wrapper_on_an_explicit_mesh():
    """On jax.make_mesh's default (Explicit) axes, where shardings are part of the types:
    operands are resharded onto the blocks, y comes back split over the batch axes and equals
    one device's."""
    weights, chosen = routing(PARAMS["x"])
    args = (PARAMS["x"], weights, chosen, PARAMS["gate"], PARAMS["up"], PARAMS["down"])
    mesh = jax.make_mesh((2, 1, 1, 4, 1), sharding.MESH_AXES)
    for cf in (0.0, E / K):
        with jax.set_mesh(mesh):
            y, dropped = jax.jit(experts.experts_ffn, static_argnames=("impl", "capacity_factor"))(
                *args, impl="xla", capacity_factor=cf)
        assert y.sharding.spec == P(("data", "expert"), None, None) and int(dropped) == 0
        close(y, jax.jit(experts.experts_ffn_ref)(*args)[0])


def test_size_one_or_undivided_axes_leave_the_layer_local():
    """No split when every axis is 1; a tensor axis that does not divide F leaves F whole."""
    assert experts.experts_split(mesh_of(), B, T, E, F) is None
    split = experts.experts_split(mesh_of(expert=2, tensor=4), B, T, E, 6)
    assert split.expert == ("expert",) and split.mlp is None and split.batch == ("expert",)
