"""`python -m jaxllm.data.prepare --input=GLOB --out=DIR`: text → pre-tokenized ArrayRecord shards.

    python -m jaxllm.data.prepare --input='corpus/*.jsonl.gz' --out=data/corpus \\
        [--tokenizer=qwen2 --max_rank=0] [--text_field=text --prompt_field=] [--workers=N]

Inputs: text files (one document each), JSON lines (plain or gzip; `--text_field`, and
`--prompt_field` for prompt masking), Parquet; `--format` forces one, else the file name
decides. The inputs are cut into units of about `--shard_mb` (16) MB of input (whole small files,
byte ranges of large plain jsonl files, row groups of Parquet files); each unit becomes one
shard, `shard-NNNNN-of-MMMMM.array_record`, written by one of `--workers` processes (all cores
by default) under a temporary name and renamed when complete.

Restart. DIR/manifest.json records the plan (inputs, sizes, options, tokenizer) and every
finished shard (documents, tokens, input bytes). Running the same command again after an
interruption redoes only the units without a finished shard: nothing is duplicated or lost.
A different input or option in the same DIR is refused once a shard is finished; until then,
the new command starts over. Train on DIR with `data_source("arrayrecord", "DIR")`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxllm.data import formats
from jaxllm.data.records import DataError, Text, text_of

MANIFEST = "manifest.json"
_TOKENIZER = None  # in a worker: the tokenizer it loaded


def input_format(path: str, forced: str) -> str:
    if forced != "auto":
        return forced
    name = path.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "text"


def plan_units(paths: list[str], forced: str, shard_bytes: int) -> list[list[list]]:
    """Units of pieces [path, format, start, end, bytes]: bytes [start, end) of a plain jsonl
    file, row group `start` of a Parquet file, or the whole file (start = end = 0)."""
    pieces = []
    for path in paths:
        fmt, size = input_format(path, forced), os.path.getsize(path)
        if fmt == "jsonl" and not _is_gzip(path) and size > shard_bytes:
            with open(path, "rb") as f:
                start = 0
                while start < size:
                    f.seek(min(start + shard_bytes, size))
                    f.readline()  # cut at a line boundary
                    end = min(f.tell(), size)
                    pieces.append([path, fmt, start, end, end - start])
                    start = end
        elif fmt == "parquet":
            meta = formats.parquet_file(path, ("", ""), "--input").metadata
            pieces += [[path, fmt, g, g + 1, size // meta.num_row_groups]
                       for g in range(meta.num_row_groups)]
        else:
            pieces.append([path, fmt, 0, 0, size])
    units, unit, filled = [], [], 0
    for piece in pieces:
        unit.append(piece)
        filled += piece[4]
        if filled >= shard_bytes:
            units.append(unit)
            unit, filled = [], 0
    return units + ([unit] if unit else [])


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _line_number(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n")


def read_piece(piece: list, fields: tuple[str, str]) -> Iterator[Text]:
    path, fmt, start, end, _ = piece
    if fmt == "text":
        with open(path, encoding="utf-8", errors="replace") as f:
            yield Text(f.read())
    elif fmt == "parquet":
        rows = formats.parquet_file(path, fields, "--input").metadata.row_group(start).num_rows
        reader, chunk = formats.Reader("parquet", fields, "--input"), formats.Chunk(
            path, path, start, rows)
        for record in range(rows):
            yield reader.read(chunk, record)
    else:
        if end:  # a byte range of a plain file
            with open(path, "rb") as f:
                f.seek(start)
                data, first_line = f.read(end - start), _line_number(path, start) + 1
        else:
            with (gzip.open if _is_gzip(path) else open)(path, "rb") as f:
                data, first_line = f.read(), 1
        for number, line in enumerate(data.splitlines(), start=first_line):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path} line {number} is not valid JSON: {e}") from None
                yield text_of(record, fields, f"{path} line {number}")


def _init_worker(tokenizer_name: str, max_rank: int) -> None:
    global _TOKENIZER
    from jaxllm.data.tokenizer import load_tokenizer

    _TOKENIZER = load_tokenizer(tokenizer_name, max_rank=max_rank)


def write_shard(job: tuple[int, str, list, tuple[str, str]]) -> dict[str, Any]:
    """Tokenizes one unit into `path` (via a temporary file, so a shard is whole or absent)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    unit, path, pieces, fields = job
    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    documents = tokens = 0
    for piece in pieces:
        for text in read_piece(piece, fields):
            ids = _TOKENIZER.encode(text.text)
            mask = None
            if text.prompt:
                prompt = _TOKENIZER.encode(text.prompt)
                mask = np.concatenate([np.zeros(len(prompt), np.uint8),
                                       np.ones(len(ids), np.uint8)])
                ids = prompt + ids
            writer.write(formats.encode_record(np.asarray(ids, np.int32), mask))
            documents += 1
            tokens += len(ids)
    writer.close()
    os.replace(tmp, path)
    input_bytes = sum(piece[4] for piece in pieces)
    return {"unit": unit, "shard": os.path.basename(path), "documents": documents,
            "tokens": tokens, "input_bytes": input_bytes}


def _write_manifest(out: str, manifest: dict) -> None:
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, MANIFEST))


def prepare(input_glob: str, out: str, *, fmt: str = "auto", text_field: str = "text",
            prompt_field: str = "", tokenizer: str = "qwen2", max_rank: int = 0,
            workers: int = 0, shard_mb: float = 16.0, max_units: int | None = None,
            progress: bool = True) -> dict:
    """Runs (or continues) a prepare; returns the manifest. `max_units` stops after that many
    new shards, as an interruption would."""
    from tqdm import tqdm

    from jaxllm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer, max_rank=max_rank)
    paths = [p for _, p in formats.list_files("text", input_glob, "--input")]
    fields = (text_field, prompt_field)
    units = plan_units(paths, fmt, int(shard_mb * 2**20))
    identity = {"inputs": [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths],
                "format": fmt, "fields": list(fields), "shard_mb": shard_mb,
                "tokenizer": [tokenizer, max_rank]}
    plan = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, MANIFEST)
    manifest = {"version": 1, "complete": False, "plan": plan,
                "tokenizer": {"name": tok.name, "spec": tokenizer, "max_rank": max_rank,
                              "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
                "options": {k: identity[k] for k in ("format", "fields", "shard_mb")},
                "inputs": len(paths), "input_bytes": sum(i[1] for i in identity["inputs"]),
                "shards": {}}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        # A finished shard is a file, recorded or not (killed between its rename and the
        # manifest's write). Without one (a run that failed at once, on a wrong --text_field,
        # say) nothing can be mixed up: another plan starts over.
        finished = any(name.endswith(".array_record") for name in os.listdir(out))
        if finished and old.get("plan") != plan:
            raise DataError(f"--out={out} holds shards of other inputs or options (plan "
                            f"{old.get('plan')}, now {plan}); use a new --out directory")
        manifest["shards"] = {name: entry for name, entry in old["shards"].items()
                              if os.path.exists(os.path.join(out, name))}
    for name in os.listdir(out):  # shards an earlier run stopped writing
        if name.endswith(".array_record.tmp"):
            os.remove(os.path.join(out, name))
    names = [f"shard-{u:05d}-of-{len(units):05d}.array_record" for u in range(len(units))]
    jobs = [(u, os.path.join(out, names[u]), units[u], fields) for u in range(len(units))
            if names[u] not in manifest["shards"]][:max_units]
    _write_manifest(out, manifest)
    todo_bytes = sum(piece[4] for _, _, pieces, _ in jobs for piece in pieces)
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    done_bytes = 0
    bar = tqdm(total=todo_bytes, unit="B", unit_scale=True, desc="prepare",
               disable=not progress or None)
    ctx = multiprocessing.get_context("spawn")  # the caller may hold JAX's threads
    with ctx.Pool(min(workers, max(1, len(jobs))), _init_worker, (tokenizer, max_rank)) as pool:
        for result in pool.imap_unordered(write_shard, jobs):
            manifest["shards"][result.pop("shard")] = result
            _write_manifest(out, manifest)
            done_bytes += result["input_bytes"]
            bar.update(result["input_bytes"])
    bar.close()
    seconds = time.perf_counter() - start
    shards = manifest["shards"]
    manifest.update(complete=len(shards) == len(units), documents=sum(
        s["documents"] for s in shards.values()), tokens=sum(s["tokens"] for s in shards.values()))
    _write_manifest(out, manifest)
    manifest["run"] = {"shards": len(jobs), "input_bytes": done_bytes, "seconds": seconds,
                       "mb_per_sec": done_bytes / 2**20 / seconds if seconds else 0.0}
    return manifest


def main(argv: list[str] | None = None) -> None:
    from jaxllm.config.cli import ArgumentParser, run_command

    parser = ArgumentParser(prog="python -m jaxllm.data.prepare",
                            description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="file, directory or glob of inputs")
    parser.add_argument("--out", required=True, help="directory for the shards and manifest")
    parser.add_argument("--format", default="auto",
                        choices=("auto", "text", "jsonl", "parquet"))
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--prompt_field", default="", help="not trained on (loss mask 0)")
    parser.add_argument("--tokenizer", default="qwen2", help="'qwen2', a .tiktoken file or "
                        "a Hugging Face vocab.json + merges.txt directory")
    parser.add_argument("--max_rank", type=int, default=0, help="0: the whole vocabulary")
    parser.add_argument("--workers", type=int, default=0, help="processes; 0: one per core")
    parser.add_argument("--shard_mb", type=float, default=16.0, help="input MB per shard")
    args = parser.parse_args(argv)
    manifest = run_command(lambda: prepare(
        args.input, args.out, fmt=args.format, text_field=args.text_field,
        prompt_field=args.prompt_field, tokenizer=args.tokenizer, max_rank=args.max_rank,
        workers=args.workers, shard_mb=args.shard_mb))
    run = manifest["run"]
    print(f"{args.out}: {len(manifest['shards'])} shards, {manifest['documents']:,} documents, "
          f"{manifest['tokens']:,} tokens; this run: {run['shards']} shards, "
          f"{run['input_bytes'] / 2**20:.1f} MB in {run['seconds']:.1f} s = "
          f"{run['mb_per_sec']:.1f} MB/s")


if __name__ == "__main__":
    main()
