"""`python -m jaxllm.convert export|import`: jaxllm checkpoints <-> Hugging Face directories.

    python -m jaxllm.convert export --workdir=DIR [--step=N] --out=HF_DIR
        [--dtype=bfloat16|float32|float16] [--max_shard_size=5GB]
        [--vocab_rows=model|tokenizer|N] [--tokenizer=NAME_OR_PATH|none]
    python -m jaxllm.convert import --hf=HF_DIR --out=CKPT_DIR [--dtype=float32|...]

`export --workdir` takes a run directory (newest checkpoint, or --step) or a params checkpoint
(what `import` and `checkpoint average` write). `--out` may be neither the source nor a run
directory. hf.py's docstring gives the rules for vocab rows, dtype and shards.
"""

from __future__ import annotations

from jaxllm.config.cli import ArgumentParser, run_command
from jaxllm.convert.shards import parse_size


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m jaxllm.convert")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="jaxllm checkpoint -> Hugging Face directory")
    exp.add_argument("--workdir", required=True,
                     help="run directory, or params checkpoint (model.json + params/)")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    exp.add_argument("--out", required=True, help="Hugging Face directory to write")
    exp.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    exp.add_argument("--max_shard_size", default="5GB",
                     help="largest safetensors file, e.g. 5GB, 500MB (powers of 1000) or bytes")
    exp.add_argument("--vocab_rows", default="model",
                     help="'model' (keep the embedding rows), 'tokenizer' (trim to its ids) "
                          "or a row count (trim or zero-pad)")
    exp.add_argument("--tokenizer", default=None,
                     help="tokenizer to write (default: the run's); 'none' writes none")
    imp = sub.add_parser("import", help="Hugging Face directory -> jaxllm params checkpoint")
    imp.add_argument("--hf", required=True, help="Hugging Face Qwen2 / Qwen2-MoE / Llama directory")
    imp.add_argument("--out", required=True, help="params checkpoint directory to write")
    imp.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"),
                     help="cast the weights (default: keep the dtype on disk)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    run_command(lambda: _run(args))


def _run(args) -> None:
    if args.command == "export":
        from jaxllm.convert.to_hf import export_checkpoint

        rows = args.vocab_rows
        if rows not in ("model", "tokenizer"):
            if not rows.isdigit():
                raise ValueError(f"--vocab_rows={rows!r}: use 'model', 'tokenizer' or a "
                                 "row count")
            rows = int(rows)
        print(export_checkpoint(args.workdir, args.out, args.step, dtype=args.dtype,
                                max_shard_bytes=parse_size(args.max_shard_size),
                                vocab_rows=rows, tokenizer=args.tokenizer))
    else:
        from jaxllm.convert.from_hf import import_hf

        m = import_hf(args.hf, args.out, args.dtype)
        print(f"imported {args.hf} ({m.family}, {m.num_layers} layers, vocab rows "
              f"{m.vocab_size}, rope_theta {m.rope_theta:g}, {m.param_dtype}) to {args.out}; "
              f"train from it with --config.init.checkpoint={args.out}")


if __name__ == "__main__":
    main()
