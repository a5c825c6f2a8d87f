"""jaxllm checkpoints -> Hugging Face directories, streamed from disk or from training memory.

Two sources, one writer (`hf.write_hf`):
* On disk: a run directory (`config.json` + `checkpoints/<step>/state`) or a params checkpoint
  (`model.json` + `params/`, what `convert import` writes). Each param is opened with
  TensorStore in the Orbax checkpoint and read a block of layers at a time, so host memory is
  bounded by the read block plus the storage chunks it touches (Orbax stores each device's
  shard of an array as one chunk), never by the model. Any one host can run it.
* In memory, during training: `export_run_checkpoint` gathers one block at a time from the
  sharded params (every process calls it; process 0 writes).

The rope base is the one the checkpoint's stage trained with (`config.stages[stage].rope_theta`
from the checkpoint's `meta`), not `config.model.rope_theta`, which later stages may change.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from typing import Any

import jax
import ml_collections as mc
import numpy as np
from etils import epath
from flax import traverse_util
from orbax.checkpoint import type_handlers

from jaxllm.checkpoint.run_dir import (
    HF_FILES,
    check_out_dir,
    checkpoint_steps,
    read_run_config,
    run_model_config,
)
from jaxllm.convert import hf, rules
from jaxllm.convert.rules import Path

# ----------------------------------------------------------------------------- Orbax on disk


def orbax_reader(item_dir: str, prefix: tuple[str, ...] = ()) -> tuple[hf.Reader, np.dtype]:
    """A reader over the params inside one Orbax PyTree item (`<step>/state` or `params`)."""
    import tensorstore as ts

    item_dir = os.path.abspath(item_dir)
    meta_path = os.path.join(item_dir, "_METADATA")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{item_dir} is not an Orbax checkpoint item (no _METADATA)")
    with open(meta_path) as f:
        meta = json.load(f)
    names = {tuple(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()}
    use_ocdbt, use_zarr3 = bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3", False))
    # One copy thread: at most one storage chunk is decoded at a time (bounds memory).
    context = type_handlers.get_ts_context(use_ocdbt=use_ocdbt, data_copy_concurrency_limit=1,
                                           file_io_concurrency_limit=1)
    opened: dict[Path, Any] = {}

    def array(path: Path):
        if path not in opened:
            key = (*prefix, *path)
            if key not in names:
                raise ValueError(f"{item_dir} holds no array {'.'.join(key)!r} (the config "
                                 "does not match the checkpoint)")
            info = type_handlers.ParamInfo(name=".".join(key), parent_dir=epath.Path(item_dir),
                                           use_zarr3=use_zarr3, is_ocdbt_checkpoint=use_ocdbt,
                                           ts_context=context)
            spec = type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
            opened.clear()  # keep one array open: each holds its own decode buffers
            opened[path] = ts.open(spec, open=True, read=True, context=context).result()
        return opened[path]

    def read(path: Path, block: slice | None) -> np.ndarray:
        t = array(path)
        region = [slice(0, n) for n in t.shape]
        if block is not None:
            region[0] = slice(*block.indices(t.shape[0])[:2])
        out = np.empty([s.stop - s.start for s in region], t.dtype.numpy_dtype)
        # One storage chunk per read: TensorStore holds every chunk a read touches at once.
        chunk = t.chunk_layout.read_chunk.shape or t.shape
        for cell in itertools.product(*(range(s.start // c * c, s.stop, c)
                                        for s, c in zip(region, chunk, strict=True))):
            box = tuple(slice(max(a, s.start), min(a + c, s.stop))
                        for a, c, s in zip(cell, chunk, region, strict=True))
            dest = tuple(slice(b.start - s.start, b.stop - s.start)
                         for b, s in zip(box, region, strict=True))
            out[dest] = t[box].read().result()
        return out

    return read, np.dtype(array(("embed", "embedding")).dtype.numpy_dtype)


def _tokenizer(spec: Any, max_rank: int = 0):
    if spec is None or spec is False or spec == "none":
        return None
    if not isinstance(spec, str | os.PathLike):
        return spec  # already a tokenizer
    from jaxllm.data.tokenizer import load_tokenizer

    return load_tokenizer(spec, max_rank=max_rank)


@dataclasses.dataclass
class SavedModel:
    """A checkpoint on disk opened for reading: its model, a param reader and its tokenizer."""

    model: mc.ConfigDict  # with the rope base the checkpoint's stage trained with
    read: hf.Reader
    source_dtype: np.dtype
    tokenizer_spec: tuple[str, int] | None  # (name or path, max_rank); None: it has none
    description: str  # "step 10 (anneal, rope_theta 1e+06) of DIR"
    hf_config_extra: dict[str, Any]  # an imported model's special ids
    tokenizer_files: str | None  # an imported model's own tokenizer files

    def tokenizer(self) -> Any:
        """The run's tokenizer, or an imported model's own; None if it has none. Loaded only
        when asked for: building a BPE from vocab.json + merges.txt takes seconds."""
        return None if self.tokenizer_spec is None else _tokenizer(*self.tokenizer_spec)


def open_checkpoint(workdir: str, step: int | None = None) -> SavedModel:
    """The newest (or `step`) checkpoint of a run directory, or a params checkpoint."""
    if os.path.exists(os.path.join(workdir, "model.json")):
        return _open_params_checkpoint(workdir)
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"--workdir={workdir} is neither a run directory (config.json + "
                                "checkpoints/) nor a params checkpoint (model.json + params/)")
    config = read_run_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"--workdir={workdir} has no checkpoints in "
                                f"{os.path.join(workdir, 'checkpoints')}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"--step={step}: {workdir} has checkpoints at steps {steps}")
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    stage = _checkpoint_stage(step_dir)
    m = run_model_config(config, stage)
    tok = config.get("tokenizer", {})
    read, source_dtype = orbax_reader(os.path.join(step_dir, "state"), prefix=("params",))
    return SavedModel(m, read, source_dtype,
                      (tok.get("name", "qwen2"), int(tok.get("max_rank", 0))),
                      f"step {step} ({stage or 'unknown stage'}, rope_theta {m.rope_theta:g}) "
                      f"of {workdir}", {}, None)


def _checkpoint_stage(step_dir: str) -> str | None:
    path = os.path.join(step_dir, "meta", "metadata")  # Orbax JsonSave's file
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("stage")


def _open_params_checkpoint(ckpt_dir: str) -> SavedModel:
    from jaxllm.checkpoint.run_dir import load_model_config

    m = load_model_config(ckpt_dir)
    read, source_dtype = orbax_reader(os.path.join(ckpt_dir, "params"))
    saved = os.path.join(ckpt_dir, HF_FILES)
    extra: dict[str, Any] = {}
    if os.path.exists(os.path.join(saved, "config.json")):
        # The source's special ids go with its tokenizer files.
        with open(os.path.join(saved, "config.json")) as f:
            source = json.load(f)
        extra = {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                 if k in source}
    files = saved if os.path.isdir(saved) else None
    spec = (saved, 0) if files and os.path.exists(os.path.join(saved, "vocab.json")) else None
    return SavedModel(m, read, source_dtype, spec, f"params checkpoint {ckpt_dir}", extra, files)


def load_checkpoint(workdir: str, step: int | None = None) -> tuple[mc.ConfigDict, dict, Any]:
    """(model config, params as numpy, tokenizer) of a run's newest (or `step`) checkpoint or
    of a params checkpoint, on one host; for generation and evaluation."""
    saved = open_checkpoint(workdir, step)
    params = {rule.path: saved.read(rule.path, None) for rule in rules.active_rules(saved.model)}
    return saved.model, traverse_util.unflatten_dict(params), saved.tokenizer()


def export_checkpoint(workdir: str, out_dir: str, step: int | None = None, *,
                      dtype: str = "bfloat16", max_shard_bytes: int = 5 * 10**9,
                      vocab_rows: int | str | None = None, tokenizer: Any = None,
                      read_bytes: int | None = None) -> str:
    """`convert export`: the newest (or `step`) checkpoint of a run, or a params checkpoint,
    to a Hugging Face directory. `tokenizer` overrides the checkpoint's (a name, path or
    tokenizer; "none" writes none). Returns a line saying what was written."""
    check_out_dir(out_dir, workdir, "--workdir")
    saved = open_checkpoint(workdir, step)
    if tokenizer is not None:
        own_files = False
        tok, extra = _tokenizer(tokenizer), {}
    else:
        own_files = saved.tokenizer_files is not None
        tok = None if own_files else saved.tokenizer()
        extra = saved.hf_config_extra
    hf.write_hf(saved.model, saved.read, saved.source_dtype, out_dir, tokenizer=tok,
                hf_config_extra=extra, dtype=dtype, max_shard_bytes=max_shard_bytes,
                vocab_rows=vocab_rows, read_bytes=read_bytes)
    if own_files:  # an imported model's own tokenizer files go back out with it
        for file in os.listdir(saved.tokenizer_files):
            if file != "config.json":
                shutil.copy2(os.path.join(saved.tokenizer_files, file),
                             os.path.join(out_dir, file))
    return f"exported {saved.description} to {out_dir}"


# ----------------------------------------------------------------------------- during training


def export_run_checkpoint(workdir: str, step: int, config: mc.ConfigDict, stage: str,
                          params: dict[str, Any], tokenizer: Any = None, *,
                          dtype: str = "bfloat16", max_shard_bytes: int = 5 * 10**9,
                          vocab_rows: int | str | None = None) -> str:
    """Writes `<workdir>/hf/<step>/` from the in-memory (sharded) params of a running job.

    `config` is the run's config and `stage` the stage that produced `params` (its rope base
    is exported). Every process must call it (blocks are gathered across processes); process 0
    writes into `<step>.tmp` and renames it when complete, so a directory that exists is whole.
    Returns the directory.
    """
    m = run_model_config(config, stage)
    if tokenizer is None:
        tokenizer = _tokenizer(config.tokenizer.name, int(config.tokenizer.max_rank))
    out_dir = os.path.join(os.path.abspath(workdir), "hf", str(step))
    tmp_dir = out_dir + ".tmp"
    if jax.process_index() == 0 and os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)
    hf.check_params(m, params)
    read, source_dtype = hf.params_reader(params)
    hf.write_hf(m, read, source_dtype, tmp_dir, tokenizer=tokenizer, dtype=dtype,
                max_shard_bytes=max_shard_bytes, vocab_rows=vocab_rows)
    if jax.process_index() == 0:
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    return out_dir
