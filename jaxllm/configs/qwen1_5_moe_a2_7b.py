"""Qwen1.5-MoE-A2.7B (≈14.3B parameters, ≈2.7B active per token, untied) with the Qwen2
three-stage recipe.

Every layer is sparse: 60 routed experts of size 1,408, 4 per token, plus a shared expert of
size 5,632 gated by a sigmoid; 16 query heads and 16 kv heads (no grouping).

Variants with a mesh that `python -m jaxllm.plan --config=configs/qwen1_5_moe_a2_7b.py:NAME
--devices=16` shows to fit (71 GB per device):
  `qwen1_5_moe_a2_7b.py:v5p_32`   a TPU v5p-32 slice (16 chips): expert 4 × fsdp 4
  `qwen1_5_moe_a2_7b.py:h100_16`  2 nodes of 8 H100s: expert 4 within a node × fsdp 4
"""

from jaxllm.config import base_config, mesh_variant, qwen2_recipe

# mesh, grad_accum
MESHES = {
    "v5p_32": (dict(data=1, fsdp=4, expert=4, sequence=1), 4),
    "h100_16": (dict(data=1, fsdp=4, expert=4, sequence=1), 4),
}


def get_config(arg=None):
    c = base_config()
    c.model.update(family="qwen2_moe", vocab_size=151936, hidden_size=2048, num_layers=24,
                   num_heads=16, num_kv_heads=16, head_dim=128, intermediate_size=5632,
                   qkv_bias=True, tie_embeddings=False, rms_norm_eps=1e-6, num_experts=60,
                   num_experts_per_tok=4, moe_intermediate_size=1408,
                   shared_expert_intermediate_size=5632, norm_topk_prob=False,
                   router_aux_loss_coef=0.001, decoder_sparse_step=1)
    qwen2_recipe(c, batch_size=512, peak_lr=4e-4, pretrain_steps=1_000_000,
                 long_context_steps=20_000, anneal_steps=10_000)
    c.mesh.update(data=1, fsdp=-1)
    mesh_variant(c, arg, MESHES, "configs/qwen1_5_moe_a2_7b.py")
    return c
