"""`python -m jaxllm.generate`: sample continuations of prompts (model/decode.py decodes).

    python -m jaxllm.generate --workdir=DIR [--step=N] --prompt=TEXT [--prompt=TEXT ...]
    python -m jaxllm.generate --hf=HF_DIR --prompt=TEXT [--max_new_tokens=64]
        [--temperature=0] [--top_k=0] [--top_p=1] [--seed=0] [--mesh=tensor:4,fsdp:2]

From Python, call `jaxllm.generate(...)` and `jaxllm.load_model(...)`: importing this module
would make `jaxllm.generate` name it instead of the function.
"""

from __future__ import annotations

from jaxllm.config.cli import ArgumentParser, add_model_source_flags, run_command
from jaxllm.convert.load import load_model
from jaxllm.model.decode import generate


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m jaxllm.generate",
                            description="Sample continuations of prompts.")
    add_model_source_flags(parser)
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0: no top-k")
    parser.add_argument("--top_p", type=float, default=1.0, help="1: no top-p")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", default="",
                        help="decode sharded over a mesh, e.g. tensor:4,fsdp:2 (default: one "
                             "device)")
    args = parser.parse_args(argv)

    def body() -> list[str]:
        model_config, params, tokenizer = load_model(args.workdir, args.hf, args.step,
                                                     args.mesh)
        return generate(model_config, params, tokenizer, args.prompt, args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)

    texts = run_command(body)
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(prompt + text)
        print("-" * 40)


if __name__ == "__main__":
    main()
