"""Generation with a KV cache: equal to full forward passes, to transformers, and sampling rules.

Models come from tests/helpers/hf.py (transformers at a trained model's scale, loaded with
load_hf), so a cache that dropped the rope offset or mixed up padding would change the argmax.
Dimension letters: B batch, P prompt length, T length, V vocab.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config.schema import ConfigError
from jaxllm.convert import load_hf
from jaxllm.convert.load import load_model
from jaxllm.data.tokenizer import save_hf_tokenizer_files
from jaxllm.model import apply, decode, forward, init_cache
from jaxllm.model.decode import generate_ids, sample
from jaxllm.parallel.sharding import mesh_from_spec
from tests.helpers.hf import hf_greedy, make_hf
from tests.helpers.runs import ROOT as ROOT_DIR

ROOT = pathlib.Path(ROOT_DIR)
PROMPT_LENGTHS = (5, 17, 1)  # left padding to 32: rows of very different lengths


@pytest.fixture(scope="module", params=["qwen2_tied", "llama"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf(path, request.param)
    model_config, params = load_hf(str(path))
    return str(path), hf_model, model_config, params


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


def test_cache_logits_equal_full_forward_at_every_step(model):
    """Prefill a left-padded batch, feed the continuation one token at a time: every step's
    logits equal those of one full forward pass over the unpadded sequence."""
    _, _, cfg, params = model
    prompts, steps = _prompts(cfg.vocab_size), 12
    continuation_BxN = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, steps))
    P = 32
    tokens_BxP = np.zeros((3, P), np.int32)
    positions_BxP = np.zeros((3, P), np.int32)
    segments_BxP = np.zeros((3, P), np.int32)
    for row, prompt in enumerate(prompts):
        tokens_BxP[row, P - len(prompt):] = prompt
        positions_BxP[row, P - len(prompt):] = np.arange(len(prompt))
        segments_BxP[row, P - len(prompt):] = 1
    step = jax.jit(lambda p, t, pos, seg, c: apply(cfg, p, t, pos, seg, c))
    logits_BxV, cache = step(params, tokens_BxP, positions_BxP, segments_BxP,
                             init_cache(cfg, 3, P + steps))
    cached = [np.asarray(logits_BxV)]
    for i in range(steps - 1):
        positions_Bx1 = np.array([[len(p) + i] for p in prompts], np.int32)
        logits_BxV, cache = step(params, continuation_BxN[:, i, None].astype(np.int32),
                                 positions_Bx1, np.ones((3, 1), np.int32), cache)
        cached.append(np.asarray(logits_BxV))
    assert int(cache["index"]) == P + steps - 1
    for row, prompt in enumerate(prompts):
        sequence = np.array([prompt + continuation_BxN[row, :steps - 1].tolist()])
        full_TxV = np.asarray(forward(cfg, params, sequence))[0]
        for i in range(steps):
            np.testing.assert_allclose(cached[i][row], full_TxV[len(prompt) - 1 + i],
                                       atol=1e-4, rtol=1e-4, err_msg=f"row {row} step {i}")


def test_greedy_decoding_is_the_argmax_of_full_forward_at_every_step(model):
    _, _, cfg, params = model
    prompts = _prompts(cfg.vocab_size, seed=2)
    out = generate_ids(cfg, params, prompts, 24)
    for prompt, new in zip(prompts, out, strict=True):
        assert len(new) == 24
        # Causal: one forward pass over the final sequence gives every step's logits.
        logits_TxV = np.asarray(forward(cfg, params, np.array([prompt + new[:-1]])))[0]
        assert np.argmax(logits_TxV[len(prompt) - 1:], axis=-1).tolist() == new
    # A prompt alone decodes as it does in the batch (padding is invisible).
    assert generate_ids(cfg, params, prompts[1:2], 24) == out[1:2]


def test_greedy_equals_transformers_generate(model):
    _, hf_model, cfg, params = model
    for prompt in _prompts(cfg.vocab_size, seed=3)[:2]:
        assert generate_ids(cfg, params, [prompt], 32)[0] == hf_greedy(hf_model, prompt, 32)


def test_rows_stop_at_eos(model):
    _, _, cfg, params = model
    prompts = _prompts(cfg.vocab_size, seed=4)
    free = generate_ids(cfg, params, prompts, 16)
    eos = free[0][3]  # row 0 produces it at step 3 (perhaps earlier too)
    stopped = generate_ids(cfg, params, prompts, 16, eos_id=eos)
    for row, new in zip(free, stopped, strict=True):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert new == row[:cut]
    assert len(stopped[0]) <= 4


def test_sharded_decoding_equals_one_device(model, monkeypatch):
    """fsdp 4 × tensor 2 over the 8 test devices, 3 prompts padded to 4 rows: load_model reads
    the params onto their training shardings, generation runs on their mesh, and the tokens are
    those of one device."""
    path, _, cfg, params = model
    save_hf_tokenizer_files(jaxllm.load_tokenizer("qwen2", max_rank=256), path)
    _, sharded_params, _ = load_model(hf=path, mesh="fsdp:4,tensor:2")
    q_kernel = sharded_params["layers"]["attn"]["q_proj"]["kernel"]  # [L, D, N, H]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "sequence"),
                                                                "tensor", None)
    assert dict(q_kernel.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2,
                                                  "expert": 1, "sequence": 1}
    seen = []
    real = decode._generate
    monkeypatch.setattr(decode, "_generate",
                        lambda params, tokens, *a, **kw: seen.append(tokens.shape[0]) or
                        real(params, tokens, *a, **kw))
    prompts = _prompts(cfg.vocab_size, seed=6)
    sharded = generate_ids(cfg, sharded_params, prompts, 16)
    assert seen == [4]  # rows padded to a multiple of data×fsdp
    assert sharded == generate_ids(cfg, params, prompts, 16)
    with pytest.raises(ConfigError, match="model.num_heads=4 does not split"):
        mesh_from_spec(cfg, "tensor:8")
    with pytest.raises(ValueError, match="AXIS:SIZE"):
        mesh_from_spec(cfg, "tenser:2")


# ----------------------------------------------------------------------------- sampling


def _reference_probs(logits_V: np.ndarray, temperature: float, top_k: int,
                     top_p: float) -> np.ndarray:
    """The slow, obvious definition: sort, cut by k, cut by cumulative mass, renormalise."""
    z = logits_V.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[:top_k or len(z)]] = True
    probs = np.where(keep, np.exp(z - z.max()), 0)
    probs /= probs.sum()
    mass = 0.0
    for i in order:
        if not keep[i]:
            continue
        if mass >= top_p:
            keep[i] = False
        mass += probs[i]
    probs = np.where(keep, probs, 0)
    return probs / probs.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.8), (1.5, 5, 0.6),
])
def test_sampling_frequencies_match_the_definition(temperature, top_k, top_p):
    logits_V = np.array([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, 1.0, 0.9, -3.0], np.float32)
    want_V = _reference_probs(logits_V, temperature, top_k, top_p)
    n = 20000
    draw = jax.jit(lambda keys: jax.vmap(
        lambda k: sample(jnp.asarray(logits_V)[None], k, temperature, top_k, top_p)[0])(keys))
    ids = np.asarray(draw(jax.random.split(jax.random.key(0), n)))
    got_V = np.bincount(ids, minlength=len(logits_V)) / n
    assert np.all(got_V[want_V == 0] == 0)  # nothing outside the allowed set
    np.testing.assert_allclose(got_V, want_V, atol=4 * np.sqrt(0.25 / n))


def test_sampling_that_leaves_one_candidate_is_greedy(model):
    _, _, cfg, params = model
    prompts = _prompts(cfg.vocab_size, seed=5)
    greedy = generate_ids(cfg, params, prompts, 8)
    assert generate_ids(cfg, params, prompts, 8, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate_ids(cfg, params, prompts, 8, temperature=1.0, top_p=1e-6, seed=3) == greedy
    sampled = generate_ids(cfg, params, prompts, 8, temperature=1.0, seed=3)
    assert sampled == generate_ids(cfg, params, prompts, 8, temperature=1.0, seed=3)  # seeded
    assert sampled != greedy


def test_bad_arguments_are_refused(model):
    _, _, cfg, params = model
    with pytest.raises(ValueError, match="empty"):
        generate_ids(cfg, params, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="outside"):
        generate_ids(cfg, params, [[cfg.vocab_size]], 4)
    with pytest.raises(ValueError, match="top_p"):
        generate_ids(cfg, params, [[1]], 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(cfg, params, [[1]], 0)


# ----------------------------------------------------------------------------- text and CLI


def test_text_api_and_cli_from_an_hf_directory(model):
    path, _, cfg, params = model
    tokenizer = jaxllm.load_tokenizer("qwen2", max_rank=256)  # ids fit the 384-row test vocab
    save_hf_tokenizer_files(tokenizer, path)
    prompts = ["def main(argv):", "x"]
    texts = jaxllm.generate(cfg, params, tokenizer, prompts, 10, stop_at_eos=False)
    ids = generate_ids(cfg, params, tokenizer.encode_batch(prompts), 10,
                       num_ids=tokenizer.vocab_size)
    assert max(max(row) for row in ids) < tokenizer.vocab_size
    assert texts == [tokenizer.decode(row) for row in ids]
    assert jaxllm.generate(cfg, params, tokenizer, prompts[0], 10, stop_at_eos=False) == texts[0]
    result = subprocess.run(
        [sys.executable, "-m", "jaxllm.generate", f"--hf={path}", f"--prompt={prompts[0]}",
         f"--prompt={prompts[1]}", "--max_new_tokens=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stopped = jaxllm.generate(cfg, params, tokenizer, prompts, 10)
    for prompt, text in zip(prompts, stopped, strict=True):
        assert prompt + text in result.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxllm.generate", f"--hf={path}x",
                          "--prompt=a"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error:" in bad.stderr
