"""Package attributes that import their module on first use (PEP 562).

`import jaxllm` and `import jaxllm.data` stay cheap: a data worker process imports neither
grain nor JAX, and `python -m jaxllm.plan` never imports the model stack.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, api: dict[str, str]) -> tuple[Callable[[str], object], list[str]]:
    """(`__getattr__`, `__all__`) for `package`, whose names `api` maps to their modules."""

    def __getattr__(name: str) -> object:
        if name in api:
            return getattr(importlib.import_module(api[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(api)
