"""Perplexity of a model on a fixed text under float weights, online fp8 / int8 weights and the FP8 KV cache.

    python bench/perplexity.py                               # builtin SmolLM2 on the GPL-3 text Debian ships
    python bench/perplexity.py --max-tokens 1024 --window 256 --device cpu
    python bench/perplexity.py --configs "float,int8 weights"  # some rows only
    python bench/perplexity.py --configs "float,int8 weights" --smooth-alpha 0.8 --smooth-targets qkv_proj,down_proj

The text is tokenized once and cut into windows of --window tokens; each window is one prompt whose prompt logprobs
(the engine's own, `SamplingParams.prompt_logprobs`) give the log-likelihood of every token after its first.
Perplexity is exp(mean negative log-likelihood) over all of them. "float" is the model in float weights: a GGUF (the
built-in SmolLM2: Q4_1 / Q8_0 blocks, which kvbox keeps packed and refuses to quantize again) is first written out
as a float safetensors folder by transformers' own GGUF reader (dequantized once, in a cache folder); fp8 / int8
quantize those float weights online (`quantization`), int8 with SmoothQuant folded in first (`smoothquant_alpha`, on
by default for int8; "int8 unsmoothed" turns it off; `--smooth-alpha` sets it for every quantized row), "fp8
outliers 1%" with 1% of each linear's input channels kept in float (`outlier_fraction`, off by default;
`--outlier-fraction` sets it for every quantized row); "fp8 KV"
keeps float weights and stores the KV cache in e4m3 (scales 1.0: a GGUF carries none), "fp8 KV calib" with scales
calibrated at start-up (`calculate_kv_scales`, on the engine's built-in calibration text, not this one). Each row
shows its change against float.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repo root replaces bench/; imported, the path stays as it is
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine import LLM, SamplingParams  # noqa: E402
from engine.models.builtin import BUILTIN_PREFIX, resolve_builtin  # noqa: E402
from engine.quantization import smoothing  # noqa: E402

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
# name -> the engine options that make it
CONFIGS = {
    "float": {},
    "fp8 weights": {"quantization": "fp8"},
    "fp8 outliers 1%": {"quantization": "fp8", "outlier_fraction": 0.01},
    "int8 weights": {"quantization": "int8"},
    "int8 unsmoothed": {"quantization": "int8", "smoothquant_alpha": None},
    "fp8 KV": {"kv_cache_dtype": "fp8"},
    "fp8 KV calib": {"kv_cache_dtype": "fp8", "calculate_kv_scales": True},
}


def float_checkpoint(model: str, cache: Path = Path.home() / ".cache" / "kvbox" / "float-checkpoints") -> str:
    """`model` itself, or for a GGUF file its float safetensors folder (written once, by transformers)."""
    path = Path(resolve_builtin(model) if model.startswith(BUILTIN_PREFIX) else model)
    if path.suffix != ".gguf":
        return model
    folder = cache / path.stem
    if not (folder / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # transformers will not save a model it marks as GGUF-quantized
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(folder)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    return str(folder)


def prompt_token_logprobs(llm: LLM, prompts: list[list[int]]) -> list[list[float]]:
    """Per prompt, the logprob of each of its tokens after the first, given those before it."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [[position.logprobs[0] for position in output.prompt_logprobs[1:]] for output in outputs]


def windows(token_ids: list[int], size: int) -> list[list[int]]:
    """Consecutive windows of `size` tokens (the last one shorter); a window of one token predicts nothing."""
    return [w for w in (token_ids[i:i + size] for i in range(0, len(token_ids), size)) if len(w) > 1]


def perplexity(model: str, text: str, window: int, max_tokens: int | None, **options) -> float:
    llm = LLM(model, max_model_len=window + 1, max_num_seqs=8, **options)  # + 1: the token it generates
    token_ids = llm.tokenizer.encode(text)[:max_tokens]
    logprobs = [lp for per_window in prompt_token_logprobs(llm, windows(token_ids, window)) for lp in per_window]
    return math.exp(-sum(logprobs) / len(logprobs))


def perplexities(model: str, text: str, window: int, max_tokens: int | None, configs: dict[str, dict],
                 **options) -> dict[str, float]:
    model = float_checkpoint(model)
    return {name: perplexity(model, text, window, max_tokens, **options, **extra) for name, extra in configs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--text", default=DEFAULT_TEXT, help="a text file")
    parser.add_argument("--window", type=int, default=512, help="tokens per prompt")
    parser.add_argument("--max-tokens", type=int, default=None, help="only the text's first N tokens")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated rows to run, float first for the comparison ({', '.join(CONFIGS)})"
                        .replace("%", "%%"))  # argparse formats help: the names hold percent signs
    parser.add_argument("--smooth-alpha", type=float, help="SmoothQuant's strength in the smoothed rows "
                        "(default: the engine's)")
    parser.add_argument("--smooth-targets", help="comma-separated linears to smooth, of "
                        f"{', '.join(t.rsplit('.', 1)[1] for t in smoothing.ALL_TARGETS)} (default: the engine's)")
    parser.add_argument("--outlier-fraction", type=float, help="the input channels kept in float in the quantized "
                        "rows (default: the engine's)")
    args = parser.parse_args()
    names = args.configs.split(",")
    if args.smooth_targets:
        by_name = {target.rsplit(".", 1)[1]: target for target in smoothing.ALL_TARGETS}
        if set(args.smooth_targets.split(",")) - set(by_name):
            parser.error(f"--smooth-targets: expected some of {', '.join(by_name)}")
        smoothing.TARGETS = tuple(by_name[name] for name in args.smooth_targets.split(","))
    if set(names) - set(CONFIGS):
        parser.error(f"--configs: unknown {sorted(set(names) - set(CONFIGS))}; expected some of {', '.join(CONFIGS)}")
    text = Path(args.text).read_text()
    model = float_checkpoint(args.model)
    print(f"model {args.model}, text {args.text}, window {args.window}, device {args.device}, dtype {args.dtype}")
    print(f"{'config':<16} {'perplexity':>10} {'vs float':>9} {'seconds':>8}")
    base = None
    for name in names:
        extra = CONFIGS[name]
        if args.smooth_alpha is not None and "quantization" in extra and "smoothquant_alpha" not in extra:
            extra = {**extra, "smoothquant_alpha": args.smooth_alpha}
        if args.outlier_fraction is not None and "quantization" in extra and "outlier_fraction" not in extra:
            extra = {**extra, "outlier_fraction": args.outlier_fraction}
        start = time.perf_counter()
        value = perplexity(model, text, args.window, args.max_tokens, device=args.device, dtype=args.dtype,
                           **extra)
        base = base or value
        print(f"{name:<16} {value:>10.4f} {100 * (value / base - 1):>+8.2f}% {time.perf_counter() - start:>8.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
