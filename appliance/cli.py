"""The `kvbox` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvbox", description="kvbox: an LLM serving appliance")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate offline from a model folder (no server)")
    generate.add_argument("--model", required=True, help="a Hugging Face model folder, a .gguf file or builtin:NAME")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    generate.add_argument("--dtype", default="auto")
    generate.add_argument("--device", default="auto")

    tiny = commands.add_parser("make-tiny-model", help="build a tiny random checkpoint (tests, demos)")
    tiny.add_argument("family")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    from engine.tools.tiny_model import build_tiny_model

    print(build_tiny_model(args.family, args.out_dir, seed=args.seed))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for prompt, output in zip(args.prompt, outputs):
        completion = output.outputs[0]
        print(f"--- {prompt!r} -> ({completion.finish_reason}, {len(completion.token_ids)} tokens)\n{completion.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
