"""Conversion between jaxllm checkpoints and Hugging Face directories (Qwen2, Qwen2-MoE,
Llama).

`load_hf` / `save_hf`: in memory. `export_checkpoint` / `import_hf`: the `python -m
jaxllm.convert export|import` commands. `export_run_checkpoint`: export from a training job.
`load_checkpoint`: a run's checkpoint as (model config, params, tokenizer), for generation.
Imports are lazy, so `import jaxllm.convert` stays cheap.
"""

from jaxllm._lazy import lazy_exports

_API = {
    "load_hf": "jaxllm.convert.hf",
    "save_hf": "jaxllm.convert.hf",
    "export_checkpoint": "jaxllm.convert.to_hf",
    "export_run_checkpoint": "jaxllm.convert.to_hf",
    "load_checkpoint": "jaxllm.convert.to_hf",
    "import_hf": "jaxllm.convert.from_hf",
}

__getattr__, __all__ = lazy_exports(__name__, _API)
