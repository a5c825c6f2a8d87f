"""Qwen2-1.5B (≈1.54B parameters, tied embeddings) with the Qwen2 three-stage recipe."""

from jaxllm.config import base_config, qwen2_recipe


def get_config(arg=None):
    c = base_config()
    c.model.update(family="qwen2", vocab_size=151936, hidden_size=1536, num_layers=28,
                   num_heads=12, num_kv_heads=2, head_dim=128, intermediate_size=8960,
                   qkv_bias=True, tie_embeddings=True, rms_norm_eps=1e-6)
    qwen2_recipe(c, batch_size=1024, peak_lr=3e-4, pretrain_steps=1_500_000,
                 long_context_steps=10_000, anneal_steps=10_000)
    c.mesh.update(data=1, fsdp=-1)
    return c
