"""FP8 W8A8 schemes side by side, fake-quantized in transformers on the float weights: how far the engine's scheme
(`quantization: fp8`: e4m3 weights per output channel, dynamic per-token activations, the last layer's down
projection in float) is from float, and how far the alternatives are (vLLM's online fp8: one scale per tensor for
weights and activations; DeepSeek-style square weight blocks with activation groups of the same width along K; finer
activation groups; the few input channels with the largest calibration |x| kept in float, or given a second e4m3
digit instead). The alternatives quantize every linear but the LM head ("all linears": the engine's scheme with
that linear 8-bit too); round to nearest e4m3 after dividing by amax / 448, as the kernels do.

    python bench/fp8_schemes.py                      # the built-in SmolLM2, Debian's GPL-3 text, windows of 512
    python bench/fp8_schemes.py --schemes float,engine --max-tokens 1024

The engine's own figure (`bench/perplexity.py --configs "float,fp8 weights"`) runs its kernels; this one isolates
the scheme from the implementation (the two agreed within 0.01 in the eighteenth session).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.perplexity import DEFAULT_MODEL, DEFAULT_TEXT, float_checkpoint, windows  # noqa: E402
from engine.quantization.spec import last_down_proj  # noqa: E402

FP8_MAX = 448.0


def _fake(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def per_row(x: torch.Tensor) -> torch.Tensor:
    """A scale per row of the last dimension: a weight's output channel, an activation's token."""
    return _fake(x, x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX)


def per_tensor(x: torch.Tensor) -> torch.Tensor:
    return _fake(x, x.abs().amax().clamp(min=1e-12) / FP8_MAX)


def per_group(size: int):
    """A scale per `size` consecutive values of a row (groups along K)."""
    def quantize(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % size:
            raise ValueError(f"groups of {size} do not divide {x.shape[-1]} inputs")
        return per_row(x.reshape(*x.shape[:-1], -1, size)).reshape(x.shape)
    return quantize


def per_block(size: int):
    """A scale per `size` x `size` block of a weight."""
    def quantize(w: torch.Tensor) -> torch.Tensor:
        out, k = w.shape
        if out % size or k % size:
            raise ValueError(f"blocks of {size} do not divide a {out} x {k} weight")
        blocks = w.reshape(out // size, size, k // size, size)
        scale = blocks.abs().amax((1, 3), keepdim=True).clamp(min=1e-12) / FP8_MAX
        return _fake(blocks, scale).reshape(out, k)
    return quantize


class KeepOutliers:
    """Activations per token, but each linear's `fraction` of input channels with the largest |x| over the engine's
    calibration text (`engine/quantization/kv_calibration.txt`, one float forward) passes in float, out of the
    quantized part and its scale (LLM.int8()'s decomposition with a static channel set): y = fp8(x without them) @
    W + x[:, them] @ W[:, them]."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def keep(self, amax: torch.Tensor) -> torch.Tensor:
        return amax.topk(max(1, round(self.fraction * amax.numel()))).indices

    @staticmethod
    def quantize(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        rest = x.index_fill(-1, keep, 0.0)
        return per_row(rest).index_copy(-1, keep, x.index_select(-1, keep))


class OutlierDigits(KeepOutliers):
    """The same channels stay in the per-token scale and in the fp8 weight, but get a second e4m3 digit: the
    rounding residual of x / scale, itself rounded to e4m3 (the engine appends it as extra K columns of the one
    FP8 GEMM, against copies of those weight columns): y = s (q + r[them]) @ W8, about 7 mantissa bits there."""

    @staticmethod
    def quantize(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)
        digit = (x / scale - q).index_select(-1, keep).to(torch.float8_e4m3fn).to(x.dtype)
        return q.index_add(-1, keep, digit) * scale


# name -> (weight quantizer, activation quantizer or None[, the last layer's down projection left in float]); the
# other schemes quantize every linear but the LM head, as the engine did before the twenty-sixth session
SCHEMES = {
    "float": None,
    "engine": (per_row, per_row, True),
    "all linears": (per_row, per_row),
    "weights only": (per_row, None),
    "vllm online": (per_tensor, per_tensor),
    # DeepSeek's 128 does not divide SmolLM2's 576-wide rows: 64 is the same idea at this width.
    "act groups 64": (per_row, per_group(64)),
    "blocks 64": (per_block(64), per_group(64)),
    "act groups 32": (per_row, per_group(32)),
    "outliers 1%": (per_row, KeepOutliers(0.01)),
    "outliers 2%": (per_row, KeepOutliers(0.02)),
    "digits 1%": (per_row, OutlierDigits(0.01)),
    "digits 2%": (per_row, OutlierDigits(0.02)),
}


@torch.inference_mode()
def input_amax(model: nn.Module, folder: str) -> dict[str, torch.Tensor]:
    """Each linear's per-input-channel max |x| over the engine's calibration text (its first 512 tokens)."""
    from transformers import AutoTokenizer

    text = (Path(__file__).resolve().parents[1] / "engine/quantization/kv_calibration.txt").read_text()
    amax, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            def record(_, args, name=name):
                seen = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
                amax[name] = torch.maximum(amax[name], seen) if name in amax else seen
            hooks.append(module.register_forward_pre_hook(record))
    model(torch.tensor([AutoTokenizer.from_pretrained(folder).encode(text, add_special_tokens=False)[:512]]))
    for hook in hooks:
        hook.remove()
    return amax


@torch.inference_mode()
def perplexity(folder: str, token_ids: list[int], window: int, scheme) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if scheme is not None:
        weights, activations, *float_last_down = scheme
        kept = last_down_proj(model.config.num_hidden_layers) if float_last_down else None
        amax = input_amax(model, folder) if isinstance(activations, KeepOutliers) else {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name and name != kept:
                module.weight.copy_(weights(module.weight))
                if isinstance(activations, KeepOutliers):
                    module.register_forward_pre_hook(
                        lambda _, args, keep=activations.keep(amax[name]), quantize=activations.quantize:
                        (quantize(args[0], keep),))
                elif activations is not None:
                    module.register_forward_pre_hook(lambda _, args, quantize=activations: (quantize(args[0]),))
    nll, count = 0.0, 0
    for ids in windows(token_ids, window):
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        nll -= logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        count += len(ids) - 1
    return math.exp(nll / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--window", type=int, default=512, help="tokens per forward")
    parser.add_argument("--max-tokens", type=int, default=None, help="only the text's first tokens")
    parser.add_argument("--schemes", default=",".join(SCHEMES),  # argparse formats help: names hold percent signs
                        help=f"comma-separated, of: {', '.join(SCHEMES)}".replace("%", "%%"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    folder = float_checkpoint(args.model)
    token_ids = AutoTokenizer.from_pretrained(folder).encode(Path(args.text).read_text(),
                                                             add_special_tokens=False)[:args.max_tokens]
    print(f"model {args.model}, text {args.text} ({len(token_ids)} tokens), window {args.window}")
    baseline = None
    for name in args.schemes.split(","):
        started = time.perf_counter()
        value = perplexity(folder, token_ids, args.window, SCHEMES[name])
        baseline = value if name == "float" else baseline
        change = f" ({100 * (value / baseline - 1):+.2f}% vs float)" if baseline and name != "float" else ""
        print(f"{name:>16}: {value:.4f}{change}  [{time.perf_counter() - started:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
