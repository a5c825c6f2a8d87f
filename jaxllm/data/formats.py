"""File formats of data sources: which files a path names, their records, and reading one.

A source's files are cut into chunks, the unit of listing, of the held-out split and of
reading for formats that have no random access:
  python_stdlib, text  one file = one chunk = one document
  jsonl                one file (plain, or gzip when it ends in .gz) = one chunk of its
                       non-blank lines, each a JSON object with a string `text_field`
  parquet              one row group = one chunk of its rows (column `text_field`)
  arrayrecord          one shard = one chunk of pre-tokenized records (`encode_record`), as
                       `python -m jaxllm.data.prepare` writes them
Text-like formats give `Text` documents (an optional `prompt_field` gives a prompt that is not
trained on); a chat source's jsonl / parquet records give `Chat` conversations (a `messages`
list of {"role", "content"}, or `prompt` and `response`), a pair source's `Pair`s of them
(`prompt`, `chosen`, `rejected`); arrayrecord gives `Tokens`.
Every error names the file, and the record or line.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import sysconfig
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxllm.data.records import DataError, Record, Text, doc_of

FORMATS = ("python_stdlib", "text", "jsonl", "parquet", "arrayrecord")
RANDOM_ACCESS = ("python_stdlib", "text", "arrayrecord")  # the others are read a chunk at a time
# What a directory path means, per format.
_DIR_PATTERNS = {"text": ("*",), "jsonl": ("*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz"),
                 "parquet": ("*.parquet",), "arrayrecord": ("*.array_record",)}
_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")  # not the standard library
_CACHED_CHUNKS = 4  # loaded jsonl files / parquet row groups kept per source and process
_RECORD_TOKENS, _RECORD_TOKENS_MASK = 1, 2  # first byte of an arrayrecord record


@dataclass(frozen=True)
class Chunk:
    path: str  # absolute
    key: str  # path relative to the source's files' common folder (+ "#N" for a row group)
    part: int  # row group of a parquet file; 0 otherwise
    records: int


@dataclass(frozen=True)
class Tokens:
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray | None  # uint8 [n]: 1 where the token is a target of the loss


def encode_record(ids: np.ndarray, mask: np.ndarray | None = None) -> bytes:
    """One pre-tokenized document: a tag byte, int32 ids, then (when given) uint8 mask."""
    ids = np.asarray(ids, "<i4")
    if mask is None:
        return bytes([_RECORD_TOKENS]) + ids.tobytes()
    return bytes([_RECORD_TOKENS_MASK]) + ids.tobytes() + np.asarray(mask, np.uint8).tobytes()


def decode_record(record: bytes, where: str) -> Tokens:
    size = len(record) - 1
    tag = record[0] if record else None
    if tag == _RECORD_TOKENS and size % 4 == 0:
        return Tokens(np.frombuffer(record, "<i4", offset=1).astype(np.int32), None)
    if tag == _RECORD_TOKENS_MASK and size % 5 == 0:
        n = size // 5
        ids = np.frombuffer(record, "<i4", count=n, offset=1).astype(np.int32)
        return Tokens(ids, np.frombuffer(record, np.uint8, offset=1 + 4 * n))
    raise DataError(f"{where}: not a jaxllm token record ({len(record)} bytes, tag {tag!r}); "
                    "write ArrayRecord shards with python -m jaxllm.data.prepare")


# ----------------------------------------------------------------------------- listing

def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_files(fmt: str, path: str, key: str) -> list[tuple[str, str]]:
    """(relative path, absolute path) of the non-empty files `path` names, sorted.

    `path` is a file, a directory or a glob (`**` recurses); relative paths are relative to
    the files' common folder, so the held-out split does not depend on where the data sits.
    """
    if fmt == "python_stdlib":
        return _walk_python_files(path or stdlib_root(), key)
    if not path:
        raise DataError(f"{key}: a {fmt} source needs a file, directory or glob")
    pattern = os.path.expanduser(path)
    if os.path.isdir(pattern):
        paths = [p for suffix in _DIR_PATTERNS[fmt]
                 for p in glob.glob(os.path.join(pattern, "**", suffix), recursive=True)]
    elif glob.has_magic(pattern):
        paths = glob.glob(pattern, recursive=True)
    elif os.path.exists(pattern):
        paths = [pattern]
    else:
        raise DataError(f"{key}: {path!r} does not exist")
    paths = sorted({os.path.abspath(p) for p in paths if os.path.isfile(p)})
    if not paths:
        raise DataError(f"{key}: {path!r} matches no files")
    paths = [p for p in paths if os.path.getsize(p) > 0]
    if not paths:
        raise DataError(f"{key}: every file {path!r} matches is empty")
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return [(os.path.relpath(p, root), p) for p in paths]


def _walk_python_files(root: str, key: str) -> list[tuple[str, str]]:
    if not os.path.isdir(root):
        raise DataError(f"{key}: {root!r} is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if filename.endswith(".py") and os.path.getsize(path) > 0:
                found.append((os.path.relpath(path, root), path))
    return sorted(found)


# ----------------------------------------------------------------------------- scanning

_SCANS: dict[tuple, list[Chunk]] = {}  # scanning a jsonl file parses all of it: once per run


def scan(fmt: str, files: list[tuple[str, str]], fields: tuple[str, ...], where: str
         ) -> list[Chunk]:
    """The chunks of the files, each checked as far as can be done before training starts."""
    chunks = []
    for rel, path in files:
        stat = os.stat(path)
        memo = (fmt, path, stat.st_size, stat.st_mtime_ns, fields)
        if memo not in _SCANS:
            _SCANS[memo] = _scan_file(fmt, rel, path, fields, where)
        chunks += _SCANS[memo]
    return chunks


def _scan_file(fmt: str, rel: str, path: str, fields: tuple[str, ...], where: str
               ) -> list[Chunk]:
    if fmt in ("python_stdlib", "text"):
        return [Chunk(path, rel, 0, 1)]
    if fmt == "jsonl":
        return [Chunk(path, rel, 0, len(_read_jsonl(path, fields, where)))]
    if fmt == "parquet":
        meta = parquet_file(path, fields, where).metadata
        return [Chunk(path, f"{rel}#{g}", g, meta.row_group(g).num_rows)
                for g in range(meta.num_row_groups)]
    if fmt == "arrayrecord":
        reader = _open_array_record(path, where)
        count = reader.num_records()
        if count:
            _read_array_record(reader, path, 0, where)
        reader.close()
        return [Chunk(path, rel, 0, count)]
    raise DataError(f"{where}.format: {fmt!r} is not one of {', '.join(map(repr, FORMATS))}")


def _read_jsonl(path: str, fields: tuple[str, ...], where: str) -> list[Record]:
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{where}: cannot read {path}: {e}") from None
    docs = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:  # also UnicodeDecodeError
            raise DataError(f"{where}: {path} line {number} is not valid JSON: {e}") from None
        docs.append(doc_of(record, fields, f"{where}: {path} line {number}"))
    return docs


def parquet_file(path: str, fields: tuple[str, ...], where: str) -> Any:
    import pyarrow.parquet as pq  # only parquet sources pay for the import

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{where}: {path} is not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if len(fields) == 3:  # a chat or pair source: fields that may be absent, checked per row
        return pf
    for key, field in (("text_field", fields[0]), ("prompt_field", fields[1])):
        if field and field not in names:
            raise DataError(f"{where}: {path} has no column {field!r} ({key}); its columns: "
                            f"{', '.join(names)}")
    return pf


def _open_array_record(path: str, where: str):
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path, "readahead_buffer_size:0")
    if not reader.ok():  # the reader reports a bad file through ok(), not by raising
        raise DataError(f"{where}: {path} is not a readable ArrayRecord file")
    return reader


def _read_array_record(reader, path: str, record: int, where: str) -> Tokens:
    try:
        data = reader.read([record])[0]
    except RuntimeError as e:
        raise DataError(f"{where}: {path} record {record} is corrupt: {e}") from None
    return decode_record(data, f"{where}: {path} record {record}")


# ----------------------------------------------------------------------------- reading

class Reader:
    """Reads record j of a chunk; picklable (open files and caches stay in their process)."""

    def __init__(self, fmt: str, fields: tuple[str, ...], where: str):
        self.fmt, self.fields, self.where = fmt, fields, where
        self.__setstate__(self.__dict__.copy())

    def __getstate__(self) -> dict:
        return {"fmt": self.fmt, "fields": self.fields, "where": self.where}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._chunks: collections.OrderedDict = collections.OrderedDict()  # loaded, LRU
        self._readers: dict[str, Any] = {}  # arrayrecord readers by path

    def read(self, chunk: Chunk, record: int) -> Record | Tokens:
        if self.fmt in ("python_stdlib", "text"):
            # Undecodable bytes become U+FFFD rather than failing a run.
            with open(chunk.path, encoding="utf-8", errors="replace") as f:
                return Text(f.read())
        if self.fmt == "arrayrecord":
            with self._lock:
                if chunk.path not in self._readers:
                    self._readers[chunk.path] = _open_array_record(chunk.path, self.where)
                reader = self._readers[chunk.path]
            return _read_array_record(reader, chunk.path, record, self.where)
        with self._lock:  # one thread loads a chunk; the others wait for it, not load it again
            docs = self._chunks.pop(chunk, None) or self._load(chunk)
            self._chunks[chunk] = docs
            while len(self._chunks) > _CACHED_CHUNKS:
                self._chunks.popitem(last=False)
        return docs[record]

    def _load(self, chunk: Chunk) -> list[Record]:
        if self.fmt == "jsonl":
            docs = _read_jsonl(chunk.path, self.fields, self.where)
        else:
            docs = self._load_row_group(chunk)
        if len(docs) != chunk.records:
            raise DataError(f"{self.where}: {chunk.path} changed while training: it had "
                            f"{chunk.records} records, now {len(docs)}")
        return docs

    def _load_row_group(self, chunk: Chunk) -> list[Record]:
        pf = parquet_file(chunk.path, self.fields, self.where)
        columns = [f for f in self.fields if f and f in pf.schema_arrow.names]
        try:
            table = pf.read_row_group(chunk.part, columns=columns).to_pydict()
        except Exception as e:
            raise DataError(f"{self.where}: {chunk.path} row group {chunk.part} is "
                            f"unreadable: {e}") from None
        rows = zip(*(table[f] for f in columns), strict=True)
        return [doc_of(dict(zip(columns, row, strict=True)), self.fields,
                         f"{self.where}: {chunk.path} row group {chunk.part} row {i}")
                for i, row in enumerate(rows)]
