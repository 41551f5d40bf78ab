"""The `kvbox` command line."""

from __future__ import annotations

import argparse
import os
import sys

from appliance.logs import FORMATS, LEVELS
from appliance.version import kvbox_version


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (the help says what applies then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0 to 65535)")
    return port


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _positive(text: str) -> int:
    value = _natural(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    # Every option's help shows its default; flag names follow vLLM's where vLLM has the option.
    formatter = _Formatter
    parser = argparse.ArgumentParser(prog="kvbox", description="kvbox: an LLM serving appliance",
                                     formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"kvbox {kvbox_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the models of a config file over the OpenAI API",
                                formatter_class=formatter)
    serve.add_argument("-c", "--config", required=True, help="the YAML config (see config.example.yaml)")
    serve.add_argument("--host", help="address to listen on, instead of the file's server.host")
    serve.add_argument("--port", type=_port, help="TCP port to listen on, instead of the file's server.port")
    serve.add_argument("--api-key-env", metavar="VAR", help="the name of an environment variable holding the one "
                       "API key, instead of the file's server.api_keys")
    serve.add_argument("--log-level", choices=LEVELS, default="info", help="the least severe level logged")
    serve.add_argument("--log-format", choices=FORMATS, default="text", help="text lines, or JSON lines for log "
                       "shippers (the engine processes follow)")
    # torchrun's environment is the fallback, as the issue asks; argparse applies `type` to a string default.
    serve.add_argument("--nnodes", type=_positive, default=os.environ.get("KVBOX_NNODES", "1"),
                       help="machines the models' tensor / pipeline ranks are spread over ($KVBOX_NNODES)")
    serve.add_argument("--node-rank", type=_natural, default=os.environ.get("KVBOX_NODE_RANK", "0"),
                       help="this machine's place, 0 to nnodes - 1; node 0 serves the API, the others only run "
                       "their ranks ($KVBOX_NODE_RANK)")
    serve.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                       help="node 0's address, where every rank rendezvouses ($MASTER_ADDR)")
    serve.add_argument("--master-port", type=_port, default=os.environ.get("MASTER_PORT", "29500"),
                       help="the first rendezvous port: each model replica takes the next one ($MASTER_PORT)")

    check = commands.add_parser("check-config", help="validate a config file without starting anything",
                                formatter_class=formatter)
    check.add_argument("config", help="the YAML config")

    chat = commands.add_parser("chat", help="chat in the terminal with a model of a running server",
                               formatter_class=formatter)
    chat.add_argument("model", help="the served model's name (or a LoRA adapter's)")
    chat.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    chat.add_argument("--api-key", help="the API key (when unset: $KVBOX_API_KEY, else $OPENAI_API_KEY)")
    chat.add_argument("--system", help="a system message")
    chat.add_argument("--max-tokens", type=int, default=512, help="the longest answer, in tokens")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")

    generate = commands.add_parser("generate", help="generate offline from a model folder (no server)",
                                   formatter_class=formatter)
    generate.add_argument("--model", required=True, help="a Hugging Face model folder, a .gguf file or builtin:NAME")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    generate.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most per prompt")
    generate.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    generate.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16 or bfloat16")
    generate.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")

    tiny = commands.add_parser("make-tiny-model", help="build a tiny random checkpoint (tests, demos)",
                               formatter_class=formatter)
    tiny.add_argument("family", help="the model family, e.g. llama or qwen3 (an unknown one lists them all)")
    tiny.add_argument("out_dir", help="the folder to write")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from appliance.node import NodeLayout
        from appliance.server import ServeOptions, serve_main

        if args.node_rank >= args.nnodes:
            parser.error(f"--node-rank {args.node_rank} is not below --nnodes {args.nnodes}")
        nodes = NodeLayout(args.nnodes, args.node_rank, args.master_addr, args.master_port)
        return serve_main(args.config, ServeOptions(args.host, args.port, args.api_key_env, args.log_level,
                                                    args.log_format, nodes))
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "chat":
        from appliance.chat_cli import chat_main, default_api_key

        return chat_main(args.model, args.url, args.api_key or default_api_key(), args.system, args.max_tokens,
                         args.temperature)
    if args.command == "generate":
        return _generate(args)
    from engine.tools.tiny_model import build_tiny_model

    print(build_tiny_model(args.family, args.out_dir, seed=args.seed))
    return 0


def _check_config(path: str) -> int:
    """0 and a summary if the config is usable, else 1 and the error on stderr. Imports no torch: a config is checked
    on machines (CI, an admin's laptop) that may have none."""
    from appliance.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    from appliance.config.check import describe_quantization

    names = ", ".join(m.name for m in config.models)
    print(f"OK: {len(config.models)} model{'s' if len(config.models) != 1 else ''} ({names})")
    for m in config.models:
        print(f"  {m.name}: quantization {describe_quantization(m)}, kv cache {m.kv_cache.dtype}")
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
