"""Configs: the schema with every key's default (schema.py), the allowed values (rules.py),
validation (validate.py), loading a file with overrides (load.py), the Qwen2 recipe's stages
(recipes.py), and the command-line convention every `python -m jaxllm.X` shares (cli.py).

A config file imports what it needs from here (`from jaxllm.config import base_config, stage`);
see jaxllm/configs/ and docs/configs.md. Names resolve lazily.
"""

from jaxllm._lazy import lazy_exports

_API = {
    "ConfigError": "jaxllm.config.schema",
    "base_config": "jaxllm.config.schema",
    "data_source": "jaxllm.config.schema",
    "stage": "jaxllm.config.schema",
    "load_config": "jaxllm.config.load",
    "validate": "jaxllm.config.validate",
    "long_documents": "jaxllm.config.recipes",
    "mesh_variant": "jaxllm.config.recipes",
    "qwen2_recipe": "jaxllm.config.recipes",
}

__getattr__, __all__ = lazy_exports(__name__, _API)
