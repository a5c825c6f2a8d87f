"""tiny's MoE sibling: a Qwen2-MoE of ~9M parameters (~5M active) that trains on 2 CPU cores
in minutes, on the same data and three stages as configs/tiny.py.

Every layer is sparse: 8 routed experts of size 192, 2 per token, plus a shared expert of
size 384 gated by a sigmoid; tiny's attention and vocabulary. Routed experts and shared expert
together are as wide per token as tiny's FFN (768).

Variants: `configs/tiny_moe.py:smoke`, a still smaller model and a few steps, for tests.
"""

import importlib.util
import os


def _tiny():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")
    spec = importlib.util.spec_from_file_location("jaxllm_configs_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    if arg not in (None, "smoke"):
        raise ValueError(f"configs/tiny_moe.py: unknown variant {arg!r}; known: smoke")
    c = _tiny().get_config(arg)
    c.model.update(family="qwen2_moe", num_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=192, shared_expert_intermediate_size=384,
                   decoder_sparse_step=1,
                   # Qwen's 0.001 over all layers pooled lets a layer of this small model send
                   # every token to one expert (expert_load 4.0, the most it can be, from step
                   # 10 to 50); each layer's own loss at 0.01 brings it to ~2.5 by step 120
                   # (docs/moe.md, "Losses and metrics").
                   router_aux_loss_coef=0.01, router_aux_loss_per_layer=True)
    if arg == "smoke":
        c.model.update(num_experts=4, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64)
    return c
