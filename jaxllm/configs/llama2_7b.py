"""Llama-2-7B (≈6.74B parameters): MHA, no QKV bias, untied, 4K context at rope base 1e4.

Llama 2 has no long-context or anneal stage: both are kept with 0 steps so that the same
`--config.stages.NAME.KEY` overrides work on every config. It trains with the Qwen2 BPE
truncated to 31,997 ranks + 3 specials (no download); set `tokenizer.name` to Llama's own
tokenizer files to use those.
"""

from jaxllm.config import base_config, stage


def get_config(arg=None):
    c = base_config()
    c.model.update(family="llama", vocab_size=32000, hidden_size=4096, num_layers=32,
                   num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=11008,
                   qkv_bias=False, tie_embeddings=False, rms_norm_eps=1e-5, rope_theta=1e4,
                   max_position_embeddings=4096)
    c.tokenizer.max_rank = 32000 - 3
    c.stages.pretrain = stage(500_000, 4096, 1024, 1e4, 3e-4, 3e-5, 2000, "cosine")
    c.stages.long_context = stage(0, 4096, 1024, 1e4, 3e-5, 3e-5, 0, "constant")
    c.stages.anneal = stage(0, 4096, 1024, 1e4, 3e-5, 3e-6, 0, "linear")
    c.mesh.update(data=1, fsdp=-1)
    return c
