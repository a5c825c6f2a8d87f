"""Data: document sources (corpus.py) and the packed, checkpointable pipeline (pipeline.py)."""

from jaxllm.data.corpus import DataError, EmptySplitError, documents, read_document
from jaxllm.data.pipeline import PackIterDataset, eval_batches, make_iterator

__all__ = [
    "DataError",
    "EmptySplitError",
    "PackIterDataset",
    "documents",
    "eval_batches",
    "make_iterator",
    "read_document",
]
