"""jaxllm: pretrain Qwen2 / Llama decoder LLMs in JAX.

The notebook API (load_config, load_hf, save_hf, forward, generate, load_tokenizer, ...;
docs/configs.md). Names resolve lazily, so `import jaxllm` stays cheap and
`python -m jaxllm.plan` never imports the model stack it does not need.
"""

from jaxllm._lazy import lazy_exports

__version__ = "0.1.0"

_API = {
    "load_config": "jaxllm.config.load",
    "forward": "jaxllm.model",
    "generate": "jaxllm.model.decode",
    "load_model": "jaxllm.convert.load",
    "load_tokenizer": "jaxllm.data.tokenizer",
    "load_hf": "jaxllm.convert",
    "save_hf": "jaxllm.convert",
}

__getattr__, __all__ = lazy_exports(__name__, _API)
