"""Qwen2-72B (≈72.7B parameters, untied) with the Qwen2 three-stage recipe.

Pretraining at 4,096 tokens with rope base 1e4 for about 7T tokens, then 32,768 tokens at
base 1e6, then an anneal that decays the learning rate on high-quality data.

Variants with a mesh that `python -m jaxllm.plan` shows to fit:
  `qwen2_72b.py:v5p_256`  a TPU v5p-256 pod slice (128 chips): fsdp 32 × sequence 4
  `qwen2_72b.py:h100_64`  8 nodes of 8 H100s: fsdp 8 across nodes × tensor 4 × sequence 2
"""

from jaxllm.config import base_config, mesh_variant, qwen2_recipe

MESHES = {
    "v5p_256": (dict(data=1, fsdp=32, tensor=1, sequence=4), 4),
    "h100_64": (dict(data=1, fsdp=8, tensor=4, sequence=2), 16),
}


def get_config(arg=None):
    c = base_config()
    c.model.update(family="qwen2", vocab_size=152064, hidden_size=8192, num_layers=80,
                   num_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=29568,
                   qkv_bias=True, tie_embeddings=False, rms_norm_eps=1e-6)
    qwen2_recipe(c, batch_size=1024, peak_lr=1.5e-4, pretrain_steps=1_700_000,
                 long_context_steps=20_000, anneal_steps=10_000)
    c.mesh.update(data=1, fsdp=-1)
    c.checkpoint.every_steps = 500
    mesh_variant(c, arg, MESHES, "configs/qwen2_72b.py")
    return c
