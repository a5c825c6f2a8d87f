"""Tiny random transformers Qwen2 and Llama models (CASES) at a trained model's weight scale:
std 1/sqrt(fan_in), q/k scaled up so attention is sharp (tests/unit/convert/test_hf.py says
why); their logits; a checkpoint's tensors read back, and compared bit for bit.
Dimension letters: B batch, T length.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import transformers
from safetensors import safe_open

CASES = {
    # name: (family, tied, rope_theta, head_dim, qkv_bias)
    "qwen2_tied": ("qwen2", True, 1e6, 16, True),
    "qwen2_untied": ("qwen2", False, 1e4, 32, True),
    "llama": ("llama", False, 5e5, 16, False),
}


def hf_config(family: str, tied: bool, rope_theta: float, head_dim: int, bias: bool):
    common = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=head_dim, intermediate_size=128,
                  tie_word_embeddings=tied, rope_theta=rope_theta, rms_norm_eps=1e-6,
                  max_position_embeddings=512)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(attention_bias=bias, **common)


@torch.no_grad()
def trained_scale(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = torch.randn(module.weight.shape, generator=g) / math.sqrt(module.in_features)
            module.weight.copy_(w * (2.5 if name.endswith(("q_proj", "k_proj")) else 1.0))
            if module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
        elif isinstance(module, torch.nn.Embedding):
            module.weight.copy_(torch.randn(module.weight.shape, generator=g))
        elif hasattr(module, "variance_epsilon"):  # RMSNorm
            module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
        elif hasattr(module, "gate_up_proj"):  # MoE experts, fused [E, 2F, D] and [E, D, F]
            for w, fan_in in ((module.gate_up_proj, module.hidden_dim),
                              (module.down_proj, module.intermediate_dim)):
                w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(fan_in))
        elif hasattr(module, "top_k"):  # MoE router [E, D]: logits of std 3, sharp routing
            module.weight.copy_(3 * torch.randn(module.weight.shape, generator=g)
                                / math.sqrt(module.hidden_dim))


def make_hf(path, case: str, seed: int = 0) -> transformers.PreTrainedModel:
    config = hf_config(*CASES[case])
    cls = transformers.Qwen2ForCausalLM if config.model_type == "qwen2" else \
        transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.config._attn_implementation = "eager"
    trained_scale(model, seed)
    model.save_pretrained(path)
    return model


@torch.no_grad()
def hf_logits(model, tokens_BxT: np.ndarray, positions_BxT: np.ndarray | None = None):
    kwargs = {} if positions_BxT is None else {"position_ids": torch.tensor(positions_BxT)}
    return model(torch.tensor(tokens_BxT, dtype=torch.long), **kwargs).logits.float().numpy()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy `generate`: exactly `new_tokens` ids after `prompt`, even past an
    EOS."""
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def tensors(directory: str) -> dict[str, np.ndarray]:
    index = os.path.join(directory, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    out = {}
    for file in files:
        with safe_open(os.path.join(directory, file), framework="np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
