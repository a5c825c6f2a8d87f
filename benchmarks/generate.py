"""Generation throughput: jaxllm.generate (KV cache, jit) vs transformers' generate on torch.

    python -m benchmarks.generate [--config=configs/tiny.py] [--batch=1,8] [--prompt_len=64]
        [--new_tokens=128]

Both sides decode the same weights (the config's model, random at a trained model's scale,
written by `save_hf` and loaded by `AutoModelForCausalLM`) greedily from the same random
prompts, for exactly `--new_tokens` tokens (no EOS stop), float32 on CPU. Prints new tokens
per second per batch size, and how many tokens the two agree on before each row's first
difference (a difference comes from a near-tie of the top two logits, ~1e-4 apart, that float
rounding breaks either way; everything after it in that row differs too). The first call
(compilation) is not timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import jax
import numpy as np

from benchmarks.timing import median_seconds


def trained_scale_params(model_config, seed: int = 0) -> dict:
    """Random weights at a trained model's scale (std 1/sqrt(fan-in)), so greedy decoding
    does not degenerate into ties."""
    from jaxllm.model import init_params

    params = init_params(model_config, jax.random.key(seed))
    return jax.tree.map(lambda x: x * 0.5 / model_config.init_std / np.sqrt(x.shape[-2])
                        if x.ndim >= 2 else x, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers

    import jaxllm
    from jaxllm.model.decode import generate_ids

    config = jaxllm.load_config(args.config)
    m = config.model
    if jax.devices()[0].platform == "cpu":
        m.dtype = "float32"
    params = trained_scale_params(m)
    with tempfile.TemporaryDirectory() as hf_dir:
        tokenizer = jaxllm.load_tokenizer(config.tokenizer.name, config.tokenizer.max_rank)
        jaxllm.save_hf(m, params, hf_dir, tokenizer, dtype="float32")
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_model.generation_config.eos_token_id = None

    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        prompts = np.random.default_rng(batch).integers(0, m.vocab_size,
                                                        (batch, args.prompt_len))
        ours: list = []
        theirs: list = []

        def run_jaxllm(prompts=prompts, out=ours):
            out[:] = generate_ids(m, params, prompts.tolist(), args.new_tokens)

        def run_transformers(prompts=prompts, out=theirs):
            with torch.no_grad():
                ids = hf_model.generate(torch.from_numpy(prompts), do_sample=False,
                                        max_new_tokens=args.new_tokens, pad_token_id=0)
            out[:] = ids[:, args.prompt_len:].tolist()

        new = batch * args.new_tokens
        jax_s = median_seconds(run_jaxllm, iters=args.repeats)
        torch_s = median_seconds(run_transformers, iters=args.repeats)
        agree = sum(next((i for i, (a, b) in enumerate(zip(x, y, strict=True))
                          if a != b), len(x))
                    for x, y in zip(ours, theirs, strict=True))
        rows.append((batch, new / jax_s, new / torch_s, f"{agree}/{new}"))
    device = jax.devices()[0]
    print(f"\nmodel {args.config} ({m.num_layers} layers, D {m.hidden_size}, vocab "
          f"{m.vocab_size}), prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, "
          f"{m.dtype}, {device.platform} {device.device_kind} / "
          f"{platform.processor() or platform.machine()} x {os.cpu_count()} cores, "
          f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"| {'batch':>5} | {'jaxllm tokens/s':>15} | {'transformers tokens/s':>21} | "
          f"{'tokens agreeing':>15} |")
    print(f"|{'-' * 7}|{'-' * 17}|{'-' * 23}|{'-' * 17}|")
    for batch, ours_tps, theirs_tps, agree in rows:
        print(f"| {batch:>5} | {ours_tps:>15.0f} | {theirs_tps:>21.0f} | {agree:>15} |")


if __name__ == "__main__":
    main()
