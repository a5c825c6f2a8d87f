"""Conversion between jaxllm params and other formats (Hugging Face)."""

from jaxllm.convert.hf import load_hf, save_hf

__all__ = ["load_hf", "save_hf"]
