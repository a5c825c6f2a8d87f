"""Document sources: which files make up a corpus and which of them are held out.

A document is one file. `documents` only lists paths (a directory walk, no reads), so a run
starts at once; `read_document` reads one file when the pipeline asks for it.

Formats (config.data.sources.<name>.format):
  python_stdlib  the running interpreter's own standard-library `.py` files (no download);
                 `path`, when set, points at another tree of `.py` files instead.
  text           `path` is a file, a directory or a glob of plain-text files.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Mapping
from typing import Any

SPLITS = ("train", "heldout")
FORMATS = ("python_stdlib", "text")
DEFAULT_HELDOUT_FRACTION = 0.02
# Third-party packages installed into the interpreter are not part of the standard library.
_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


class DataError(ValueError):
    """A data source that cannot work; the message names the source or the path."""


class EmptySplitError(DataError):
    """A source has files, but none of them fall in the requested split."""


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _walk_python_files(root: str) -> list[tuple[str, str]]:
    """(relative path, absolute path) of every non-empty `.py` file under root, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for filename in filenames:
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            if os.path.getsize(path) > 0:
                found.append((os.path.relpath(path, root), path))
    return sorted(found)


def _text_files(pattern: str) -> list[tuple[str, str]]:
    """(relative path, absolute path) of every non-empty file the path or glob names, sorted."""
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not paths:
        raise DataError(f"text source path {pattern!r} matches no files")
    paths = [os.path.abspath(p) for p in paths if os.path.getsize(p) > 0]
    if not paths:
        return []
    # Relative to the common folder, so the train/held-out split does not depend on where
    # the corpus sits on disk.
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return sorted((os.path.relpath(p, root), p) for p in paths)


def is_heldout(relative_path: str, fraction: float) -> bool:
    """A stable hash of the path (not Python's salted hash()) decides, so every run agrees."""
    digest = hashlib.blake2b(relative_path.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _get(source_cfg: Mapping[str, Any] | Any, key: str, default: Any) -> Any:
    try:
        value = source_cfg[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def documents(source_cfg: Mapping[str, Any], split: str, name: str = "source") -> list[str]:
    """Absolute paths of the documents of one source's split, sorted; nothing is read.

    Raises DataError for an unknown format or split, a glob matching nothing, or an empty
    split, naming the source.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(map(repr, SPLITS))}")
    fmt = _get(source_cfg, "format", "python_stdlib")
    path = _get(source_cfg, "path", "")
    fraction = float(_get(source_cfg, "heldout_fraction", DEFAULT_HELDOUT_FRACTION))
    if fmt == "python_stdlib":
        root = path or stdlib_root()
        if not os.path.isdir(root):
            raise DataError(f"data.sources.{name}.path: {root!r} is not a directory")
        files = _walk_python_files(root)
    elif fmt == "text":
        if not path:
            raise DataError(f"data.sources.{name}.path: a text source needs a path or glob")
        files = _text_files(path)
    else:
        raise DataError(f"data.sources.{name}.format: {fmt!r} is not one of "
                        f"{', '.join(map(repr, FORMATS))}")
    want_heldout = split == "heldout"
    paths = [p for rel, p in files if is_heldout(rel, fraction) == want_heldout]
    if not paths:
        where = path or stdlib_root()
        raise EmptySplitError(f"data.sources.{name}: the {split!r} split of {where!r} is empty "
                        f"({len(files)} non-empty files, heldout_fraction={fraction})")
    return paths


def read_document(path: str) -> str:
    """One document's text; undecodable bytes become U+FFFD rather than failing a run."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
