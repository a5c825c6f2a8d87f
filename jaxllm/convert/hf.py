"""Hugging Face checkpoints (Qwen2, Qwen2-MoE, Llama) <-> jaxllm params, streamed tensor by
tensor. `rules.py` names every tensor; this module moves them, by these rules:

* Vocab rows: export writes the model's rows and `vocab_size` = rows, as Qwen publishes;
  `vocab_rows="tokenizer"` trims to the tokenizer's ids, `vocab_rows=N` trims or pads with zero
  rows, never below the tokenizer's size. Import keeps the Hugging Face rows.
* dtype: export writes bfloat16 by default, `dtype="float32"` keeps the master weights;
  `save_hf` and import keep the dtype they are given unless told otherwise.
* Shards: files of at most `max_shard_bytes` (5 GB), with `model.safetensors.index.json` when
  there is more than one, planned before any data is read (shards.py).
* Memory: export reads a stacked param at most `read_bytes` at a time and writes one tensor at
  a time; import builds each param with `jax.make_array_from_callback`, reading from
  safetensors only the block each device holds.
Design notes: docs/conversion.md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import ml_collections as mc
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from jaxllm.convert import rules
from jaxllm.convert.hf_config import QWEN_ENDOFTEXT, config_from_hf, config_to_hf, read_hf_config
from jaxllm.convert.shards import ShardedWriter, tensor_files
from jaxllm.parallel import sharding

__all__ = ["load_hf", "save_hf", "write_hf", "read_hf_params", "config_from_hf", "config_to_hf"]

NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
             "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Buffers some exporters write that carry no learned state.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
READ_BYTES = 1 << 30  # default export read block

# (param path, block of the first stacked axis or None for an unstacked param) -> array
Reader = Callable[[rules.Path, slice | None], np.ndarray]


def np_dtype(name: str) -> np.dtype:
    if name not in NP_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(NP_DTYPES)}")
    return NP_DTYPES[name]


def export_rows(m: mc.ConfigDict, tokenizer: Any = None, vocab_rows: int | str | None = None
                ) -> int:
    """The exported vocab rows under the rule in this module's docstring."""
    ids = int(tokenizer.vocab_size) if tokenizer is not None else None
    if ids is not None and ids > m.vocab_size:
        raise ValueError(f"the tokenizer has {ids} ids but model.vocab_size is {m.vocab_size} "
                         "rows: this tokenizer is not the model's")
    if vocab_rows in (None, "model", 0):
        rows = int(m.vocab_size)
    elif vocab_rows == "tokenizer":
        if ids is None:
            raise ValueError("vocab_rows='tokenizer' needs a tokenizer")
        rows = ids
    else:
        rows = int(vocab_rows)
    if ids is not None and rows < ids:
        raise ValueError(f"vocab_rows={rows} is below the tokenizer's {ids} ids; those ids "
                         "would have no embedding")
    if ids is None and rows < m.vocab_size:
        raise ValueError(f"vocab_rows={rows} trims the model's {m.vocab_size} rows; trimming "
                         "needs the tokenizer, to know which rows no id uses")
    return rows


# ----------------------------------------------------------------------------- save


def write_hf(m: mc.ConfigDict, read: Reader, source_dtype: np.dtype, out_dir: str, *,
             tokenizer: Any = None, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9,
             vocab_rows: int | str | None = None, read_bytes: int | None = None,
             hf_config_extra: dict[str, Any] | None = None) -> None:
    """Streams the params behind `read` into a Hugging Face directory.

    Every process must call it when the reader gathers across processes; process 0 writes.
    """
    config_to_hf(m, "float32")  # refuses a family with no export before any work
    out_dtype = np_dtype(dtype) if dtype is not None else np.dtype(source_dtype)
    rows = export_rows(m, tokenizer, vocab_rows)
    plan = rules.export_plan(m, out_dtype, rows)
    read_bytes = read_bytes or min(READ_BYTES, max_shard_bytes // 2)
    writing = jax.process_index() == 0
    with ShardedWriter(out_dir, [e.info for e in plan], max_shard_bytes) if writing \
            else contextlib.nullcontext() as writer:
        k = 0
        while k < len(plan):
            entry = plan[k]
            if entry.rule is None:
                if writer:
                    writer.write(entry.info.name, np.zeros(entry.info.shape, out_dtype))
                k += 1
                continue
            end = k
            while end < len(plan) and plan[end].rule is entry.rule:
                end += 1
            group = plan[k:end]
            for block, entries in _blocks(m, entry.rule, group, source_dtype, read_bytes):
                x = read(entry.rule.path, block)
                for e in entries:
                    index = (e.index[0] - block.start, *e.index[1:]) if block else ()
                    w = rules.to_hf(e.rule, np.asarray(x[index]).astype(out_dtype), rows)
                    if writer:
                        writer.write(e.info.name, w)
                del x
            k += len(group)
    if not writing:
        return
    eos_id = int(getattr(tokenizer, "eos_id", QWEN_ENDOFTEXT))
    hf_config = config_to_hf(m, out_dtype.name, eos_id)
    hf_config["vocab_size"] = rows
    hf_config.update(hf_config_extra or {})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out_dir)


def _blocks(m, rule: rules.Rule, group: list[rules.Entry], source_dtype, read_bytes: int):
    """(block of the first stacked axis, its entries), each block at most read_bytes."""
    if not rule.placeholders:
        return [(None, group)]
    per_index = np.dtype(source_dtype).itemsize * int(np.prod(
        rules.stacked_shape(m, rule)[1:]))
    step = max(1, read_bytes // max(per_index, 1))
    n = rules.stack_sizes(m, rule)[0]
    return [(slice(s, min(s + step, n)),
             [e for e in group if s <= e.index[0] < min(s + step, n)]) for s in range(0, n, step)]


def params_reader(params: dict[str, Any]) -> tuple[Reader, np.dtype]:
    """A reader over an in-memory params tree (numpy or jax.Array, sharded or not)."""
    flat = traverse_util.flatten_dict(params)

    def read(path: rules.Path, block: slice | None) -> np.ndarray:
        if path not in flat:
            raise ValueError(f"params lack {'/'.join(path)}")
        x = flat[path]
        return sharding.to_host(x if block is None else x[block])  # one block at a time

    embed = flat.get(("embed", "embedding"))
    if embed is None:
        raise ValueError("params lack embed/embedding")
    return read, np.dtype(embed.dtype)


def check_params(m: mc.ConfigDict, params: dict[str, Any]) -> None:
    flat = traverse_util.flatten_dict(params)
    active = rules.active_rules(m)
    unknown = sorted(set(flat) - {r.path for r in active})
    if unknown:
        raise ValueError(f"params hold {['/'.join(p) for p in unknown]}, which a {m.family} "
                         f"model with qkv_bias={m.qkv_bias}, tie_embeddings={m.tie_embeddings} "
                         "has no Hugging Face name for")
    for rule in active:
        want = rules.stacked_shape(m, rule)
        if rule.path not in flat:
            raise ValueError(f"params lack {'/'.join(rule.path)} (needed for {rule.hf!r})")
        if tuple(flat[rule.path].shape) != want:
            raise ValueError(f"param {'/'.join(rule.path)} has shape "
                             f"{tuple(flat[rule.path].shape)}, the model config implies {want}")


def save_hf(model_config: mc.ConfigDict, params: dict[str, Any], out_dir: str,
            tokenizer: Any = None, dtype: str | None = None,
            max_shard_bytes: int = 5 * 10**9, vocab_rows: int | str | None = None) -> None:
    """Writes a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads.

    `dtype` ("float32", "bfloat16", "float16") casts the weights; by default they keep their
    dtype. Call it on every process when params span processes (process 0 writes).
    """
    if dtype is not None:
        np_dtype(dtype)
    check_params(model_config, params)
    read, source_dtype = params_reader(params)
    write_hf(model_config, read, source_dtype, out_dir, tokenizer=tokenizer, dtype=dtype,
             max_shard_bytes=max_shard_bytes, vocab_rows=vocab_rows)


def _save_tokenizer(tokenizer: Any, out_dir: str) -> None:
    try:
        from jaxllm.data.tokenizer import save_hf_tokenizer_files
    except ImportError as e:  # the weights are still worth writing without the tokenizer
        warnings.warn(f"tokenizer files not written: {e}", stacklevel=3)
        return
    save_hf_tokenizer_files(tokenizer, out_dir)


# ----------------------------------------------------------------------------- load


def _flat_range(sl: tuple[slice, ...], dims: tuple[int, ...]) -> tuple[int, int] | None:
    """The flat [start, stop) of a box in row-major `dims`, or None if it is not contiguous."""
    ranges = [s.indices(d)[:2] for s, d in zip(sl, dims, strict=True)]
    partial = [j for j, (a, b) in enumerate(ranges) if (a, b) != (0, dims[j])]
    j = partial[0] if partial else len(dims)
    if any(b - a != 1 for a, b in ranges[:j]) or any(p > j for p in partial):
        return None
    start = int(np.ravel_multi_index([a for a, _ in ranges], dims)) if dims else 0
    extent = ranges[j][1] - ranges[j][0] if j < len(dims) else 1
    return start, start + extent * int(np.prod(dims[j + 1:]))


def _read_block(handle, name: str, rule: rules.Rule, shape: tuple[int, ...],
                sl: tuple[slice, ...], at: tuple[int, int] | None = None) -> np.ndarray:
    """The block `sl` of one jaxllm slice, reading only what it needs where the layout allows.
    `at` = (expert, first row): the slice is that part of a fused [E, rows, in] tensor."""
    t = handle.get_slice(name)
    if rule.kind == "copy":
        return t[sl] if sl else t[:]
    lead, row0 = ((slice(at[0], at[0] + 1),), at[1]) if at else ((), 0)
    if rule.kind == "linear":
        n = rule.n_in
        rin, rout = _flat_range(sl[:n], shape[:n]), _flat_range(sl[n:], shape[n:])
        if rin and rout:
            block = t[(*lead, slice(row0 + rout[0], row0 + rout[1]), slice(*rin))]
            return block.reshape(block.shape[-2:]).T.reshape(
                [s.indices(d)[1] - s.indices(d)[0] for s, d in zip(sl, shape, strict=True)])
        w = t[(*lead, slice(row0, row0 + math.prod(shape[n:])), slice(None))]  # odd sharding
        return rules.to_jax(rule, w.reshape(w.shape[-2:]), shape)[sl]
    return rules.to_jax(rule, t[:], shape)[sl]  # biases are small; read whole


def read_hf_params(hf_dir: str, m: mc.ConfigDict, shardings: dict | None = None,
                   dtype: str | None = None) -> dict[str, Any]:
    """Params of `m` from `hf_dir`, each built on its sharding (default: the first device)
    from only the blocks each device holds. `dtype` casts (default: the dtype on disk)."""
    files = tensor_files(hf_dir)
    flat_sh = traverse_util.flatten_dict(shardings) if shardings else {}
    default_sh = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    flat: dict[rules.Path, jax.Array] = {}
    used: set[str] = set()
    with contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(p, framework="np"))
                   for p in set(files.values())}

        def handle(name: str, expected: tuple[int, ...]):
            h = handles[files[name]]
            got = tuple(h.get_slice(name).get_shape())
            if got != tuple(expected):
                raise ValueError(f"{hf_dir}: tensor {name!r} has shape {got}, config.json "
                                 f"implies {tuple(expected)}")
            used.add(name)
            return h

        def source(rule: rules.Rule, ix: tuple[int, ...], want: tuple[int, ...]):
            """(file handle, tensor name, None or (expert, first row) in a fused tensor)."""
            name = rules.hf_name(rule, ix)
            if name in files:
                return handle(name, want), name, None
            fused = rules.fused_name(rule, ix) if rule.fused else ""
            if fused in files:
                part, parts = rule.part
                return (handle(fused, (m.num_experts, parts * want[0], want[1])), fused,
                        (ix[1], part * want[0]))
            raise ValueError(f"{hf_dir} is missing tensor {name!r}"
                             f"{f' (or {fused!r})' if fused else ''} (a {m.family} model with "
                             f"qkv_bias={m.qkv_bias}, tie_embeddings={m.tie_embeddings})")

        for rule in rules.active_rules(m):
            shape, n_stack = rules.slice_shape(m, rule), len(rule.placeholders)
            want = rules.hf_shape(rule, shape)
            sources = {ix: source(rule, ix, want) for ix in rules.indices(m, rule)}
            h, name, _ = next(iter(sources.values()))
            disk = _ST_DTYPES.get(h.get_slice(name).get_dtype())
            if disk is None:
                raise ValueError(f"{hf_dir}: tensor {name!r} is {h.get_slice(name).get_dtype()}"
                                 f"; jaxllm reads {', '.join(_ST_DTYPES)}")
            cast = np_dtype(dtype or disk)

            def block(index, rule=rule, shape=shape, n_stack=n_stack, sources=sources,
                      cast=cast) -> np.ndarray:
                index = tuple(index)
                stacked = rules.stack_sizes(m, rule)
                ranges = [range(*s.indices(n)) for s, n in zip(index, stacked, strict=False)]
                parts = [_read_block(*sources[ix][:2], rule, shape, index[n_stack:],
                                     sources[ix][2]) for ix in itertools.product(*ranges)]
                out = np.stack(parts).reshape(*map(len, ranges), *parts[0].shape)
                return out.astype(cast, copy=False)

            full = rules.stacked_shape(m, rule)
            flat[rule.path] = jax.make_array_from_callback(
                full, flat_sh.get(rule.path, default_sh), block)
        _check_leftovers(hf_dir, m, files, handles, used, flat)
    return traverse_util.unflatten_dict(flat)


def _check_leftovers(hf_dir, m, files, handles, used, flat) -> None:
    leftover = sorted(set(files) - used)
    # Tensors jaxllm has no param for: accepted when all zero, or when inert in `m`.
    zero_only = {rules.hf_name(z, (i,)): z.inert and z.when(m) for z in rules.ZERO_TENSORS
                 for i in range(m.num_layers)}
    if m.tie_embeddings and "lm_head.weight" in leftover:
        # Some exporters write the tied head anyway; harmless when it is the embedding.
        head = handles[files["lm_head.weight"]].get_tensor("lm_head.weight")
        if not np.array_equal(head, np.asarray(flat[("embed", "embedding")])):
            raise ValueError(f"{hf_dir}: config.json ties the embeddings but lm_head.weight "
                             "differs from model.embed_tokens.weight")
        leftover.remove("lm_head.weight")
    for name in [n for n in leftover if n in zero_only]:
        if not zero_only[name] and np.any(handles[files[name]].get_tensor(name)):
            raise ValueError(f"{hf_dir}: tensor {name!r} is nonzero; jaxllm has no such "
                             "parameter, so converting would change the model")
        leftover.remove(name)
    leftover = [n for n in leftover if not n.endswith(_IGNORED_SUFFIXES)]
    if leftover:
        more = f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""
        raise ValueError(f"{hf_dir} has tensors a {m.family} model does not use: "
                         f"{', '.join(map(repr, leftover[:5]))}{more}")


def load_hf(hf_dir: str, shardings: dict | None = None, dtype: str | None = None
            ) -> tuple[mc.ConfigDict, dict[str, Any]]:
    """Reads a Hugging Face Qwen2 / Qwen2-MoE / Llama directory into (model config, params).

    Params are `jax.Array`s in the dtype on disk (or `dtype`), layers stacked along a leading
    L axis, on `shardings` (a tree like the params) or else the first local device. The model
    computes in config.json's dtype, or in `dtype` when given (model.dtype and
    model.param_dtype both), as `from_pretrained(hf_dir, dtype=...)` does in transformers.
    """
    m, _ = read_hf_config(hf_dir)
    if dtype is not None:
        np_dtype(dtype)  # refuses an unknown name before any tensor is read
        m.dtype = dtype
    params = read_hf_params(hf_dir, m, shardings, dtype)
    m.param_dtype = str(np.dtype(params["embed"]["embedding"].dtype).name)
    return m, params
