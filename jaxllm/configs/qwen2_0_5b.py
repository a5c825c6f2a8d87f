"""Qwen2-0.5B (≈494M parameters, tied embeddings) with the Qwen2 three-stage recipe."""

from jaxllm.config import base_config, qwen2_recipe


def get_config(arg=None):
    c = base_config()
    c.model.update(family="qwen2", vocab_size=151936, hidden_size=896, num_layers=24,
                   num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864,
                   qkv_bias=True, tie_embeddings=True, rms_norm_eps=1e-6)
    qwen2_recipe(c, batch_size=512, peak_lr=3e-4, pretrain_steps=500_000,
                 long_context_steps=5_000, anneal_steps=5_000)
    return c
