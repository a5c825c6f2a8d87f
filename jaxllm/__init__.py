"""jaxllm: pretrain Qwen2 / Llama decoder LLMs in JAX.

The notebook API of DESIGN §1. Names resolve lazily, so `import jaxllm` stays cheap and
`python -m jaxllm.plan` never imports the model stack it does not need.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "load_config": "jaxllm.config",
    "forward": "jaxllm.model",
    "generate": "jaxllm.generate",
    "load_tokenizer": "jaxllm.tokenizer",
    "load_hf": "jaxllm.convert",
    "save_hf": "jaxllm.convert",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
