"""Qwen2-7B (≈7.62B parameters, untied) with the Qwen2 three-stage recipe."""

from jaxllm.config import base_config, qwen2_recipe


def get_config(arg=None):
    c = base_config()
    c.model.update(family="qwen2", vocab_size=152064, hidden_size=3584, num_layers=28,
                   num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944,
                   qkv_bias=True, tie_embeddings=False, rms_norm_eps=1e-6)
    qwen2_recipe(c, batch_size=1024, peak_lr=3e-4, pretrain_steps=1_700_000,
                 long_context_steps=20_000, anneal_steps=10_000)
    c.mesh.update(data=1, fsdp=-1)
    return c
