"""Qwen2-57B-A14B (≈57.4B parameters, ≈14.2B active per token, untied) with the Qwen2
three-stage recipe.

Every layer is sparse: 64 routed experts of size 2,560, 8 per token, plus a shared expert of
size 20,480 gated by a sigmoid. The published model was upcycled from Qwen2-7B
(`--config.init.upcycle_from=QWEN2_7B_DIR`, see docs/moe.md, "Upcycling").

Variants with a mesh that `python -m jaxllm.compile` compiles and finds to fit, both
fsdp 2 × tensor 2 × expert 8 × sequence 4 with 8 micro-batches (8,192 tokens a device each):
  `qwen2_57b_a14b.py:v5p_256`   a TPU v5p-256 pod slice (128 chips): 48.0 GiB of 95 per chip
  `qwen2_57b_a14b.py:h100_128`  16 nodes of 8 H100s (sequence 4 × expert 2 within a node):
                                40.3 GiB of 79.1 per GPU
The earlier fsdp 8 × tensor 2 × expert 8 with 2 micro-batches (32,768 tokens a device) needed
98.3 GiB on v5p: dropless expert parallelism sizes its receive buffers for every routed copy
of the expert group landing on one device, so they grow with the tokens a device holds.
"""

from jaxllm.config import base_config, mesh_variant, qwen2_recipe

# mesh, grad_accum
MESHES = {
    "v5p_256": (dict(data=1, fsdp=2, tensor=2, expert=8, sequence=4), 8),
    "h100_128": (dict(data=1, fsdp=2, tensor=2, expert=8, sequence=4), 8),
}


def get_config(arg=None):
    c = base_config()
    c.model.update(family="qwen2_moe", vocab_size=151936, hidden_size=3584, num_layers=28,
                   num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944,
                   qkv_bias=True, tie_embeddings=False, rms_norm_eps=1e-6, num_experts=64,
                   num_experts_per_tok=8, moe_intermediate_size=2560,
                   shared_expert_intermediate_size=20480, norm_topk_prob=False,
                   router_aux_loss_coef=0.001, decoder_sparse_step=1)
    qwen2_recipe(c, batch_size=1024, peak_lr=3e-4, pretrain_steps=1_700_000,
                 long_context_steps=20_000, anneal_steps=10_000)
    c.mesh.update(data=1, fsdp=-1)
    c.checkpoint.every_steps = 500
    mesh_variant(c, arg, MESHES, "configs/qwen2_57b_a14b.py")
    return c
