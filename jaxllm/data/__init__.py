"""Data: document sources (corpus.py) and the striped, checkpointable pipeline (pipeline.py)."""

from jaxllm.data.corpus import DataError, EmptySplitError, documents, read_document
from jaxllm.data.pipeline import StripedBatchIterator, eval_batches, make_iterator

__all__ = [
    "DataError",
    "EmptySplitError",
    "StripedBatchIterator",
    "documents",
    "eval_batches",
    "make_iterator",
    "read_document",
]
