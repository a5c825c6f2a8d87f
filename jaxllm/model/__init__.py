"""Qwen2 / Llama decoder transformers as pure functions of (params, tokens)."""

from jaxllm.model.transformer import (
    Transformer,
    abstract_params,
    apply,
    forward,
    frozen,
    init_cache,
    init_params,
    param_count,
)

__all__ = ["Transformer", "abstract_params", "apply", "forward", "frozen", "init_cache",
           "init_params", "param_count"]
