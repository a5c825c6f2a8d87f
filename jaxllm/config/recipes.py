"""Building blocks for config files: the Qwen2 recipe's three stages, long-document sources
for a stage, named mesh variants. Each config in configs/ starts from
`jaxllm.config.base_config()` and may call these."""

from __future__ import annotations

import ml_collections as mc

from jaxllm.config.schema import data_source, stage


def long_documents(config: mc.ConfigDict, stage_name: str = "long_context",
                   min_tokens: int = 4096, keep_short: float = 0.1) -> None:
    """Points a stage's mixture at long-document views of its sources: each source `s` gets a
    copy `s_long` that reads documents of at least `min_tokens` tokens (by default longer than
    the Qwen2 recipe's 4K pretraining context) and a `keep_short` share of the others (so long
    ones are upweighted 1/keep_short times), packed with long documents aligned to rows."""
    mixture = config.stages[stage_name].mixture
    weights = {}
    for name, weight in mixture.items():
        long_name = f"{name}_long"
        src = config.data.sources[name].to_dict()
        src.update(min_tokens=min_tokens, keep_short=float(keep_short), align_long=True)
        config.data.sources[long_name] = data_source(**src)
        weights[long_name] = weight
    config.stages[stage_name].mixture = weights


def qwen2_recipe(config: mc.ConfigDict, *, batch_size: int, peak_lr: float,
                 pretrain_steps: int, long_context_steps: int, anneal_steps: int) -> None:
    """The Qwen2 report's three stages: 4K tokens at rope base 1e4, then 32K at 1e6 near the
    end of pretraining, then a learning-rate anneal on high-quality data."""
    long_batch = max(1, batch_size // 8)  # same tokens per step at 8x the context
    config.stages.pretrain = stage(pretrain_steps, 4096, batch_size, 1e4, peak_lr, peak_lr / 10,
                                   2000, "cosine")
    config.stages.long_context = stage(long_context_steps, 32768, long_batch, 1e6, peak_lr / 10,
                                       peak_lr / 10, 0, "constant")
    config.stages.anneal = stage(anneal_steps, 32768, long_batch, 1e6, peak_lr / 10,
                                 peak_lr / 100, 0, "linear")
    config.model.rope_theta = 1e6  # the final base: what an exported model runs with
    long_documents(config)  # long_context: documents >= 4K tokens (10x upweighted), row-aligned


def mesh_variant(config: mc.ConfigDict, arg: str | None, meshes: dict, where: str) -> None:
    """A config file's named mesh variant: `meshes[arg]` is (mesh sizes, grad_accum); None
    keeps the defaults."""
    if arg is None:
        return
    if arg not in meshes:
        raise ValueError(f"{where}: unknown variant {arg!r}; known: {', '.join(meshes)}")
    mesh, config.optimizer.grad_accum = meshes[arg]
    config.mesh.update(mesh)
