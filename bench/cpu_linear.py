"""The CPU linears of a whole model, one forward's worth, at several row counts: kvbox's packed kernel
(`engine/kernels/cpu_packed_linear.c`) against MKL's GEMM on the plain weight (torch's float32 `F.linear`) and
oneDNN's on its own reordered copy (torch's `mkldnn._linear_pointwise`, what kvbox ran bf16 linears with before).

    python bench/cpu_linear.py --dtype bfloat16 --rows 1,8,32,128,512
    python bench/cpu_linear.py --dtype float32

SmolLM2-135M's shapes by default (30 layers of qkv, o, gate_up, down, then the head: 256 MB of bf16 weights, more
than the caches hold, as in a decode step), random weights; the best of --iters passes per system, the systems
alternating. Prints ms per pass, GFLOP/s and the weights' GB/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.kernels import cpu_native  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", default="1,8,32,128")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--qkv", type=int, default=960)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    h, i = args.hidden, args.intermediate
    shapes = [(args.qkv, h), (h, h), (2 * i, h), (h, i)] * args.layers + [(args.vocab, h)]
    weights = [torch.randn(n, k).to(dtype) for n, k in shapes]
    if not cpu_native.supports_packing(weights[0]):
        print(f"the packed kernel does not take {args.dtype} weights on this machine")
        return 1
    systems = {"kvbox packed": [cpu_native.pack_linear_weight(w) for w in weights]}
    if torch.backends.mkldnn.is_available():
        # bf16: the batch hint kvbox reordered with; float32: 128, the best of 1 and 128 over these row counts
        hint = 1 if dtype == torch.bfloat16 else 128
        systems["oneDNN reordered"] = [torch.ops.mkldnn._reorder_linear_weight(w, hint) for w in weights]
    if dtype == torch.float32:
        systems["MKL plain"] = weights
    run = {"kvbox packed": cpu_native.packed_linear, "MKL plain": F.linear,
           "oneDNN reordered": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    print(f"{args.dtype}, {len(shapes)} linears, {weight_bytes / 1e6:.0f} MB of weights, {args.threads} threads")
    print(f"{'rows':>5} {'system':<17} {'ms':>8} {'GFLOP/s':>8} {'GB/s':>6}")
    for rows in map(int, args.rows.split(",")):
        inputs = {k: torch.randn(rows, k).to(dtype) for k in {k for _, k in shapes}}
        flops = sum(2 * rows * n * k for n, k in shapes)
        best = {name: float("inf") for name in systems}
        for it in range(args.iters + 1):  # the first pass of each warms it up
            for name in (list(systems) if it % 2 == 0 else list(systems)[::-1]):
                start = time.perf_counter()
                for (_, k), weight in zip(shapes, systems[name]):
                    run[name](inputs[k], weight)
                if it:
                    best[name] = min(best[name], time.perf_counter() - start)
        for name, seconds in best.items():
            print(f"{rows:>5} {name:<17} {seconds * 1e3:>8.2f} {flops / seconds / 1e9:>8.0f} "
                  f"{weight_bytes / seconds / 1e9:>6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
