"""Which linears' 8-bit weights cost a model most: the engine's fp8 weight rounding (e4m3 per output channel) applied
to one group of decoder linears at a time, every other linear and every activation left in float, in transformers
(float32). Each row is the mean KL divergence from the float model's next-token distribution over the text's
positions, and the perplexity change; a group per projection kind, then a group per layer, then each kind of the
layers named by --layers. The twenty-sixth session found the last layer's down projection there (bench/RESULTS.md),
which online quantization now leaves in float (`engine.quantization.spec.last_down_proj`).

    python bench/fp8_sensitivity.py                                 # the built-in SmolLM2, GPL-3's first 2048 tokens
    python bench/fp8_sensitivity.py --text /usr/share/common-licenses/Apache-2.0 --layers 0,29
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.fp8_schemes import per_row  # noqa: E402
from bench.perplexity import DEFAULT_MODEL, DEFAULT_TEXT, float_checkpoint, windows  # noqa: E402


class Probe:
    """The float model, its linears' float and fp8-rounded weights, and the float run's log-probabilities."""

    def __init__(self, folder: str, token_ids: list[int], window: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.windows = list(windows(token_ids, window))
        self.linears = {name: module for name, module in self.model.named_modules()
                        if isinstance(module, nn.Linear) and "lm_head" not in name}
        self.float = {name: module.weight.detach().clone() for name, module in self.linears.items()}
        self.rounded = {name: per_row(weight) for name, weight in self.float.items()}
        self.base = self.logprobs()

    @torch.inference_mode()
    def logprobs(self) -> list[torch.Tensor]:
        return [torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1) for ids in self.windows]

    @torch.inference_mode()
    def score(self, names: list[str]) -> tuple[float, float]:
        """(mean KL(float || rounded), perplexity change in %) with `names`' weights rounded."""
        for name in names:
            self.linears[name].weight.copy_(self.rounded[name])
        got = self.logprobs()
        for name in names:
            self.linears[name].weight.copy_(self.float[name])
        positions = sum(len(ids) for ids in self.windows)
        kl = sum((base.exp() * (base - lp)).sum().item() for base, lp in zip(self.base, got)) / positions
        return kl, 100 * (math.exp((self.nll(got) - self.nll(self.base)) / (positions - len(self.windows))) - 1)

    def nll(self, logprobs: list[torch.Tensor]) -> float:
        return -sum(lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
                    for lp, ids in zip(logprobs, self.windows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--window", type=int, default=512, help="tokens per forward")
    parser.add_argument("--max-tokens", type=int, default=2048, help="the text's first tokens")
    parser.add_argument("--layers", default="", help="layers whose kinds get a row each (comma-separated; "
                                                     "default: the first and the last)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    folder = float_checkpoint(args.model)
    token_ids = AutoTokenizer.from_pretrained(folder).encode(Path(args.text).read_text(),
                                                             add_special_tokens=False)[:args.max_tokens]
    probe = Probe(folder, token_ids, args.window)
    layer_of = {name: int(name.split(".")[2]) for name in probe.linears}
    kind_of = {name: name.rsplit(".", 1)[1] for name in probe.linears}
    last = max(layer_of.values())
    detail = [int(layer) for layer in args.layers.split(",") if layer] or [0, last]
    print(f"model {args.model}, text {args.text} ({len(token_ids)} tokens), window {args.window}")
    groups = [("all", list(probe.linears))]
    groups += [(kind, [n for n in probe.linears if kind_of[n] == kind]) for kind in sorted(set(kind_of.values()))]
    groups += [(f"layer {layer}", [n for n in probe.linears if layer_of[n] == layer]) for layer in range(last + 1)]
    groups += [(f"layer {layer} {kind_of[n]}", [n]) for layer in detail for n in probe.linears if layer_of[n] == layer]
    for label, names in groups:
        kl, change = probe.score(names)
        print(f"{label:>26}: KL {kl:.5f}  perplexity {change:+.2f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
