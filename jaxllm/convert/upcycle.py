"""Upcycling a dense model into a Qwen2-MoE's initial weights (`config.init.upcycle_from`).

Dimension letters (docs/glossary.md): Ls the sparse layers of the MoE, F the dense FFN's
intermediate size, Fe an expert's (moe_intermediate_size), Fs the shared expert's; copies =
⌈E·Fe / F⌉ shuffled copies of a dense FFN.

The Qwen2 report's recipe, per sparse layer (the MoE's dense layers copy the dense FFN). A unit
is a gate_proj column, the up_proj column and the down_proj row of the same index.
* Experts: `copies` copies of the dense FFN, each one's units shuffled by its own seeded
  permutation (`permutations`), concatenated and cut into E experts of Fe units (the rest
  discarded).
* Re-initialisation: a seeded round(`reinit_fraction` · Fe) of each expert's units re-drawn
  from the model's init (normal, init_std), whole units.
* Shared expert: units 0..Fs-1 of the dense FFN (past F, extra units with zero down rows), its
  gate zero and its down rows doubled, so with Fs ≥ F it equals the dense FFN.
* Router: normal(init_std), so routing starts near uniform.
* Everything else is copied (`upcycle_plan` names a key that differs); vocab rows past the
  MoE's vocab_size are dropped.
Each expert param is built by its own jit, a layer at a time, onto its target sharding.
Design notes: docs/moe.md.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import zlib

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxllm.config.schema import ConfigError
from jaxllm.model import abstract_params
from jaxllm.model.layers import dtype_of
from jaxllm.model.transformer import layer_groups

Path = tuple[str, ...]
# The keys a dense model and its MoE must share: the copied weights' shapes and function.
SAME_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "qkv_bias",
             "tie_embeddings", "rms_norm_eps")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What upcycling one dense model into one MoE does, computed from the configs alone."""

    dense_size: int  # F
    num_experts: int  # E
    expert_size: int  # Fe
    copies: int  # ⌈E·Fe / F⌉
    discarded: int  # copies·F − E·Fe units no expert gets, per layer
    reinit_units: int  # units re-drawn per expert and layer: round(fraction·Fe)
    shared_size: int  # Fs (0: no shared expert)
    sparse_layers: tuple[int, ...]  # dense layer indices that become MoE layers
    group: int  # layers per scanned group of the MoE (decoder_sparse_step, or 1)
    vocab_rows_dropped: int

    def describe(self) -> str:
        kept = min(self.shared_size, self.dense_size)
        shared = (f"shared expert of {self.shared_size} units ({kept} dense units, down ×2, "
                  "gate 0)" if self.shared_size else "no shared expert")
        return (f"upcycling {len(self.sparse_layers)} sparse layers: each dense FFN of "
                f"{self.dense_size} units copied {self.copies} times, shuffled, cut into "
                f"{self.num_experts} experts of {self.expert_size} ({self.discarded} units "
                f"discarded), {self.reinit_units} units of each expert re-initialised; "
                f"{shared}; {self.vocab_rows_dropped} padding vocab rows dropped")


def upcycle_plan(dense: mc.ConfigDict, moe: mc.ConfigDict, reinit_fraction: float = 0.5,
              where: str = "the dense model") -> Plan:
    """Checks that `dense` can be upcycled into `moe` (ConfigError naming the key otherwise)
    and says how; `where` names the dense source in messages."""
    if not moe.num_experts or moe.family != "qwen2_moe":
        raise ConfigError(f"config.model.family={moe.family!r} with num_experts="
                          f"{moe.num_experts}: upcycling builds a qwen2_moe model with experts")
    if dense.num_experts:
        raise ConfigError(f"config.init.upcycle_from: {where} has num_experts="
                          f"{dense.num_experts}; upcycling starts from a dense model")
    for key in SAME_KEYS:
        if dense[key] != moe[key]:
            raise ConfigError(f"config.model.{key}={moe[key]!r}, but {where} has "
                              f"{dense[key]!r}; upcycling copies everything but the FFN, so "
                              "the two must agree")
    if moe.vocab_size > dense.vocab_size:
        raise ConfigError(f"config.model.vocab_size={moe.vocab_size}, but {where} has only "
                          f"{dense.vocab_size} rows; upcycling may drop padding rows, not add")
    if not 0.0 <= reinit_fraction <= 1.0:
        raise ConfigError(f"config.init.upcycle_reinit: {reinit_fraction!r} is outside [0, 1]")
    E, Fe, F = moe.num_experts, moe.moe_intermediate_size, dense.intermediate_size
    copies = math.ceil(E * Fe / F)
    groups, step = layer_groups(moe)
    return Plan(dense_size=F, num_experts=E, expert_size=Fe, copies=copies,
                discarded=copies * F - E * Fe, reinit_units=int(round(reinit_fraction * Fe)),
                shared_size=moe.shared_expert_intermediate_size,
                sparse_layers=tuple(g * step + step - 1 for g in range(groups)), group=step,
                vocab_rows_dropped=dense.vocab_size - moe.vocab_size)


# ----------------------------------------------------------------------------- unit choices

def _rng(seed: int, layer: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, layer, stream])


def permutations(seed: int, layer: int, dense_size: int, copies: int) -> np.ndarray:
    """[copies, F] int: copy c of dense layer `layer`'s FFN puts its unit perm[c, j] at place j."""
    rng = _rng(seed, layer, 0)
    return np.stack([rng.permutation(dense_size) for _ in range(copies)])


def unit_sources(plan: Plan, seed: int) -> dict[str, np.ndarray]:
    """Per sparse layer, which dense unit each expert / shared unit copies (host-side ints):

    experts_LsxExFe  the dense unit behind unit m of expert e
    reinit_LsxExFe   True where that unit is re-drawn instead
    shared_LsxFs     the dense unit behind shared unit s (its down row is zero for s ≥ F)
    """
    E, Fe, F, Fs = plan.num_experts, plan.expert_size, plan.dense_size, plan.shared_size
    experts, reinit, shared = [], [], []
    for layer in plan.sparse_layers:
        units = permutations(seed, layer, F, plan.copies).reshape(-1)[:E * Fe]
        experts.append(units.reshape(E, Fe))
        rng = _rng(seed, layer, 1)
        mask_ExFe = np.zeros((E, Fe), bool)
        for e in range(E):
            mask_ExFe[e, rng.permutation(Fe)[:plan.reinit_units]] = True
        reinit.append(mask_ExFe)
        extra = max(0, Fs - F)
        rng = _rng(seed, layer, 2)
        shuffled = [rng.permutation(F) for _ in range(math.ceil(extra / F))]
        shared.append(np.concatenate([np.arange(F), *shuffled])[:Fs])
    return {"experts_LsxExFe": np.stack(experts).astype(np.int32),
            "reinit_LsxExFe": np.stack(reinit), "shared_LsxFs": np.stack(shared).astype(np.int32)}


def param_shapes(model_cfg: mc.ConfigDict) -> dict:
    """ShapeDtypeStructs of the model's params, allocating nothing. Unboxed without sharding
    constraints: under a mesh and logical rules (the pipeline) `nn.unbox` would apply them
    to shapes."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False),
                        abstract_params(model_cfg),
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


# ----------------------------------------------------------------------------- building params
# Module-level jits with static layouts: upcycling again (another seed or fraction, gate and
# up alike) reuses the compiled code.

def _key(seed: int, path: Path) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(path).encode()))


def _normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    # Drawn flat: XLA on CPU compiles a multi-dimensional threefry draw several times slower.
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def _place(x: jax.Array, sharding) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _layer_sharding(sharding):
    """One layer's slice of a stacked [Ls, ...] param's sharding (None: let XLA choose)."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec(*sharding.spec[1:]))


@functools.partial(jax.jit, static_argnames=("down", "dtype", "layers", "sharding"))
def _experts(dense, units_LsxExFe, reinit_LsxExFe, sparse_Ls, key, std, *, down: bool, dtype,
             layers: tuple[int, int], sharding):
    """dense [L, D, F] (gate, up) or [L, F, D] (down) → experts [Ls, E, D, Fe] / [Ls, E, Fe, D],
    one layer at a time; `layers` = (first sparse layer, step)."""
    layer_sh = _layer_sharding(sharding)

    def one(args):
        w, units_ExFe, reinit_ExFe, layer = args
        w = w.astype(dtype)
        if down:
            copy, mask = w[units_ExFe], reinit_ExFe[:, :, None]  # [E, Fe, D]
        else:
            copy, mask = jnp.moveaxis(w[:, units_ExFe], 0, 1), reinit_ExFe[:, None, :]
        copy = _place(copy, layer_sh)
        noise = _normal(jax.random.fold_in(key, layer), copy.shape, dtype)
        return jnp.where(mask, (std * noise).astype(dtype), copy)

    start, step = layers
    out = jax.lax.map(one, (dense[start::step], units_LsxExFe, reinit_LsxExFe, sparse_Ls))
    return _place(out, sharding)


@functools.partial(jax.jit, static_argnames=("down", "dtype", "dense_size", "layers",
                                             "sharding"))
def _shared(dense, shared_LsxFs, *, down: bool, dtype, dense_size: int, layers: tuple[int, int],
            sharding):
    """dense [L, D, F] / [L, F, D] → shared expert [Ls, D, Fs] / [Ls, Fs, D]; down rows ×2, and 0
    past the first F units (duplicates)."""

    def one(args):
        w, units_Fs = args
        w = w.astype(dtype)
        if not down:
            return _place(w[:, units_Fs], _layer_sharding(sharding))
        first_Fsx1 = (jnp.arange(units_Fs.shape[0]) < dense_size)[:, None]
        return _place(jnp.where(first_Fsx1, w[units_Fs] * 2, 0).astype(dtype),
                      _layer_sharding(sharding))

    start, step = layers
    return _place(jax.lax.map(one, (dense[start::step], shared_LsxFs)), sharding)


@functools.partial(jax.jit, static_argnames=("specs", "dtype", "shardings"))
def _light(sources: dict, key, std, *, specs: tuple, dtype, shardings: tuple):
    """The copied params, the router and the shared-expert gate; `specs` holds one
    (shape, how) per output: ("copy", source path, layer start, layer step, vocab rows or
    -1), ("normal",) or ("zeros",)."""
    out = []
    for (shape, how), sharding in zip(specs, shardings, strict=True):
        if how[0] == "normal":
            x = (std * _normal(key, shape, dtype)).astype(dtype)
        elif how[0] == "zeros":
            x = jnp.zeros(shape, dtype)
        else:
            _, path, start, step, rows = how
            x = sources[path][start::step] if path[0] == "layers" else sources[path]
            if rows >= 0:
                x = x[:rows] if path == ("embed", "embedding") else x[:, :rows]
            x = x.astype(dtype)
        out.append(_place(x, sharding))
    return tuple(out)


def upcycle(dense_params: dict, dense_model_cfg: mc.ConfigDict, moe_model_cfg: mc.ConfigDict, *,
            seed: int, reinit_fraction: float = 0.5, init_std: float | None = None,
            shardings: dict | None = None, where: str = "the dense model") -> dict:
    """Dense params → the MoE's params by the recipe above (pure; same seed, same result).

    `dense_params` are the dense model's (jax or numpy arrays; on any sharding); the result is
    in the MoE's param_dtype, each leaf on its entry of `shardings` (a tree like the MoE's
    params) when given. `init_std` defaults to the MoE config's.
    """
    plan = upcycle_plan(dense_model_cfg, moe_model_cfg, reinit_fraction, where)
    std = np.float32(moe_model_cfg.init_std if init_std is None else init_std)
    dtype = dtype_of(moe_model_cfg.param_dtype)
    dense = traverse_util.flatten_dict(dense_params)
    want = traverse_util.flatten_dict(param_shapes(dense_model_cfg))
    for path, leaf in want.items():
        got = tuple(dense[path].shape) if path in dense else "nothing"
        if got != leaf.shape:
            raise ValueError(f"{where}: param {'/'.join(path)} has shape {got}, its model "
                             f"config implies {leaf.shape}")
    target = traverse_util.flatten_dict(param_shapes(moe_model_cfg))
    flat_sh = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    src = unit_sources(plan, seed)
    sparse_Ls = np.asarray(plan.sparse_layers, np.int32)
    step, rows = plan.group, moe_model_cfg.vocab_size if plan.vocab_rows_dropped else -1

    light, out = {}, {}
    for path in target:
        if path[0] != "layers":
            light[path] = ("copy", path, 0, 1, rows if path[0] in ("embed", "lm_head") else -1)
            continue
        j, rest = (0, path[1:]) if step == 1 else (int(path[1].removeprefix("layer_")), path[2:])
        if rest[0] != "mlp" or j != step - 1:  # attention, norms, a dense layer's FFN
            light[path] = ("copy", ("layers", *rest), j, step, -1)
        elif rest[1] in ("router", "shared_expert_gate"):
            light[path] = ("normal",) if rest[1] == "router" else ("zeros",)
        elif rest[1] in ("experts", "shared_expert"):
            w = dense[("layers", "mlp", rest[2], "kernel")]
            static = dict(down=rest[2] == "down_proj", dtype=dtype, layers=(j, step),
                          sharding=flat_sh.get(path))
            # One param per jit: only its own temporaries are ever live.
            out[path] = (_experts(w, src["experts_LsxExFe"], src["reinit_LsxExFe"], sparse_Ls,
                                  _key(seed, path), std, **static)
                         if rest[1] == "experts" else
                         _shared(w, src["shared_LsxFs"], dense_size=plan.dense_size, **static))
        else:
            raise ValueError(f"upcycle: no rule for the MoE param {'/'.join(path)}")
    sources = {how[1]: dense[how[1]] for how in light.values() if how[0] == "copy"}
    specs = tuple((target[p].shape, how) for p, how in light.items())
    made = _light(sources, _key(seed, ("router",)), std, specs=specs, dtype=dtype,
                  shardings=tuple(flat_sh.get(p) for p in light))
    out.update(zip(light, made, strict=True))
    return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------- from config

def read_dense_config(source: str) -> tuple[mc.ConfigDict, str]:
    """(model config, "checkpoint" or "hf") of `config.init.upcycle_from`."""
    if os.path.exists(os.path.join(source, "model.json")):
        from jaxllm.checkpoint.run_dir import load_model_config

        return load_model_config(source), "checkpoint"
    if os.path.exists(os.path.join(source, "config.json")):
        from jaxllm.convert.hf import read_hf_config

        return read_hf_config(source)[0], "hf"
    raise ConfigError(f"config.init.upcycle_from={source!r} is neither a jaxllm params "
                      "checkpoint (model.json; `python -m jaxllm.checkpoint average "
                      "--workdir=RUN --last=1 --out=DIR` makes one of a run) nor a Hugging Face "
                      "directory (config.json)")


def upcycled_params(config: mc.ConfigDict, shardings: dict | None = None) -> dict:
    """The MoE params of `config.model` upcycled from `config.init.upcycle_from`, each on its
    entry of `shardings` (the train state's param shardings; default: one device).

    Seed `config.seed`; re-initialised fraction `config.init.upcycle_reinit` (0.5 if the key
    is absent); the dense weights are read onto shardings of the same mesh, never whole onto
    one host.
    """
    from jaxllm.checkpoint.run_dir import load_params
    from jaxllm.checkpoint.state import abstract_like
    from jaxllm.parallel import sharding as sharding_lib

    source = config.init.upcycle_from
    where = f"config.init.upcycle_from={source!r}"
    dense_cfg, kind = read_dense_config(source)
    fraction = float(config.init.upcycle_reinit)
    logging.info("%s", upcycle_plan(dense_cfg, config.model, fraction, where).describe())
    boxed = abstract_params(dense_cfg)
    leaves = jax.tree.leaves(shardings) if shardings is not None else []
    if leaves and isinstance(leaves[0], jax.sharding.NamedSharding):
        dense_sh = sharding_lib.param_shardings(boxed, leaves[0].mesh)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        dense_sh = jax.tree.map(lambda _: one, param_shapes(dense_cfg))
    if kind == "checkpoint":
        dense = load_params(source, abstract_like(param_shapes(dense_cfg), dense_sh))
    else:
        from jaxllm.convert.hf import read_hf_params

        dense = read_hf_params(source, dense_cfg, dense_sh)
    return upcycle(dense, dense_cfg, config.model, seed=int(config.seed),
                   reinit_fraction=fraction, init_std=config.model.init_std,
                   shardings=shardings, where=where)
