"""Data: sources and formats → seeded mixture → loader (threads or processes) → packed batches.

formats.py (files and records), sources.py (split, order), mixture.py (weights → document
sequence), loader.py (reading off the training thread), packing.py (striped rows, state),
pipeline.py (config → iterator), prepare.py (the `python -m jaxllm.data.prepare` CLI).

Names resolve lazily, so a data worker process imports neither grain nor JAX.
"""

import importlib

_API = {
    "DataError": "jaxllm.data.formats",
    "EmptySplitError": "jaxllm.data.sources",
    "open_source": "jaxllm.data.sources",
    "StripedBatchIterator": "jaxllm.data.packing",
    "check_sources": "jaxllm.data.pipeline",
    "document_sequence": "jaxllm.data.pipeline",
    "eval_batches": "jaxllm.data.pipeline",
    "make_iterator": "jaxllm.data.pipeline",
    "process_share": "jaxllm.data.pipeline",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'jaxllm.data' has no attribute {name!r}")
