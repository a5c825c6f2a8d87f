"""Data: sources and formats → seeded mixture → loader (threads or processes) → packed batches.

formats.py (files and records), sources.py (split, order), mixture.py (weights → document
sequence), loader.py (reading off the training thread), packing.py (striped rows, state),
iterator.py (config → iterator), tokenizer.py (Qwen2 BPE), prepare.py (the `python -m
jaxllm.data.prepare` CLI).

Names resolve lazily, so a data worker process imports neither grain nor JAX.
"""

from jaxllm._lazy import lazy_exports

_API = {
    "DataError": "jaxllm.data.formats",
    "EmptySplitError": "jaxllm.data.sources",
    "open_source": "jaxllm.data.sources",
    "StripedBatchIterator": "jaxllm.data.packing",
    "check_sources": "jaxllm.data.iterator",
    "document_sequence": "jaxllm.data.iterator",
    "eval_batches": "jaxllm.data.iterator",
    "make_iterator": "jaxllm.data.iterator",
    "process_share": "jaxllm.data.iterator",
}

__getattr__, __all__ = lazy_exports(__name__, _API)
