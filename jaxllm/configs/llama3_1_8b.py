"""Llama-3.1-8B (≈8.03B parameters): GQA 32/8, no QKV bias, untied, rope base 500,000.

Pretraining at 8,192 tokens; Meta's long-context stage (to 128K) needs the `llama3` rope
scaling, which jaxllm does not have yet, so it is kept at 0 steps. It trains with the Qwen2 BPE
truncated to fit 128,256 rows; set `tokenizer.name` to Llama's own tokenizer files to use those.
"""

from jaxllm.config import base_config, stage


def get_config(arg=None):
    c = base_config()
    c.model.update(family="llama", vocab_size=128256, hidden_size=4096, num_layers=32,
                   num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                   qkv_bias=False, tie_embeddings=False, rms_norm_eps=1e-5, rope_theta=5e5,
                   max_position_embeddings=131072)
    c.tokenizer.max_rank = 128256 - 3
    c.stages.pretrain = stage(1_200_000, 8192, 512, 5e5, 3e-4, 3e-5, 8000, "cosine")
    c.stages.long_context = stage(0, 131072, 32, 5e5, 3e-5, 3e-5, 0, "constant")
    c.stages.anneal = stage(0, 8192, 512, 5e5, 3e-5, 0.0, 0, "linear")
    c.mesh.update(data=1, fsdp=-1)
    return c
