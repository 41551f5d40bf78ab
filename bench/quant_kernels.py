"""Times the quantized linears against bf16 cuBLAS on Llama-3.1-8B's four projections (CUDA only), to pick the
W4A16 kernel's launch heuristics and to see where the W8A8 path's time goes (int8 also with asymmetric
activations: the zero-point epilogue's cost).

Each figure is one call's time inside a CUDA graph of many calls (as the engine replays decode steps), so launch
gaps count as they do there. The bf16 and 8-bit weights are larger than L2 (50 MB on an H100 / H200); the 4-bit
ones of qkv, o and down (13, 8 and 29 MB) are not, so replays may find them there. Bandwidth: weight bytes / time.

    python bench/quant_kernels.py [--rows 1,16,64,256] [--sweep fused,gemv,mma,skinny] [--shapes qkv,gate_up]
    python bench/quant_kernels.py --rows 128,256 --shapes qkv,gate_up --sweep fused \
        --fused-configs "128,128,64,1,8,3;256,128,64,1,8,3"

--sweep times every launch configuration of a small grid per shape and row count, for the kernels named, and
prints the best next to the heuristic's choice: the W4A16 fused kernel, the W4A16 GEMV (up to 4 rows), the W4A16
tensor-core kernel (its line is printed at every row count, with its largest difference from dequantize + cuBLAS)
and the 8-bit skinny kernel (up to 16 rows). --fused-configs / --mma-configs replace the fused / tensor-core
kernel's grid with the launches listed (fused: BLOCK_M, BLOCK_N, BLOCK_K, K splits, warps, stages; tensor-core:
BLOCK_N, BLOCK_M, STEP_WORDS, K splits, warps, stages; each compiles once per shape, a second or two): a targeted
sweep that fits one device call.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.quantization.wna16 import default_g_idx, pack_rows  # noqa: E402
from engine.kernels import act_quant, reference, w8a8, wna16  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
DEV = torch.device("cuda")
CALLS = 24


def graph_time_us(fn) -> float:
    """Microseconds per call of `fn`, replayed CALLS times in one CUDA graph, median of 5 replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return sorted(times)[2]


def layers(k: int, n: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * k**-0.5
    q4 = pack_rows(torch.randint(0, 16, (k, n), generator=g), 4).to(DEV)
    scales = (torch.rand(k // 128, n, generator=g) * 0.01).half().to(DEV)
    zeros = torch.full((k // 128, n), 8, dtype=torch.int16, device=DEV)
    g_idx = default_g_idx(k, 128, DEV)
    fp8, fp8_scale = reference.quantize_activations(w, torch.float8_e4m3fn)
    i8, i8_scale = reference.quantize_activations(w, torch.int8)
    return (w.to(DEV, torch.bfloat16), (q4, scales, zeros, g_idx), (fp8.to(DEV), fp8_scale[:, 0].to(DEV)),
            (i8.to(DEV), i8_scale[:, 0].to(DEV)))


def row(name: str, us: float, weight_bytes: int, base_us: float) -> str:
    return f"  {name:34s} {us:8.1f} us {weight_bytes / us / 1e3:7.0f} GB/s {base_us / us:6.2f}x bf16"


def best_of(configs, call, each: bool = False) -> tuple[float, tuple]:
    """(us, config) of the fastest config; a config that does not compile or run is skipped. `each`: prints every
    config's time too."""
    best = (float("inf"), None)
    for config in configs:
        try:
            us = graph_time_us(lambda: call(config))
        except Exception as error:  # noqa: BLE001
            if each:
                print(f"    {config}: {type(error).__name__}: {str(error)[:100]}")
            continue
        if each:
            print(f"    {config}: {us:.1f} us")
        best = min(best, (us, config))
    return best


def sweep(x, q, k, n, configs: list[tuple[int, ...]] | None = None) -> tuple[float, tuple]:
    m = x.shape[0]
    grid = [c for c in itertools.product(
        [1, 16] if m == 1 else [16, 64, 128] if m > 16 else [16], [32, 64, 128], [128, 256], [1, 2, 4, 8, 16], [4],
        [3]) if not (c[0] == 64 and c[1] == 128 and c[2] == 256)]
    return best_of(configs or grid, lambda config: wna16.wna16_linear(x, *q, 4, None, 128, config=config),
                   each=bool(configs))


def sweep_gemv(x, q) -> tuple[float, tuple]:
    configs = [(block_n, step, splits, warps, depth)
               for block_n, warps in [(128, 1), (256, 1), (256, 2), (512, 2), (512, 4), (1024, 4)]
               for step, splits, depth in itertools.product([4, 8, 16], [4, 8, 16, 32, 64], [0, 1, 2])]
    return best_of(configs, lambda config: wna16.wna16_linear(x, *q, 4, None, 128, gemv_config=config))


def sweep_mma(x, q, configs: list[tuple[int, ...]] | None = None) -> tuple[float, tuple]:
    if x.shape[0] <= 16:
        grid = itertools.product([64, 128], [16], [16], [1, 2, 4, 8], [4, 8], [3, 4, 6])
    else:
        grid = itertools.product([64, 128, 256], [64, 128], [16], [1, 2], [4, 8], [3])
    return best_of(configs or grid, lambda config: wna16.wna16_linear(x, *q, 4, None, 128, mma_config=config),
                   each=bool(configs))


def sweep_skinny(x, w8) -> tuple[float, tuple]:
    xq, xs = act_quant.quantize_activations(x, w8[0].dtype)
    configs = itertools.product([16, 32, 64], [256, 512], [4], [3, 5])
    return best_of(configs, lambda config: w8a8.w8a8_skinny(xq, w8[0], xs, w8[1], None, x.dtype, config))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,16,64,256")
    parser.add_argument("--sweep", default="", help="kernels to sweep: fused, gemv, skinny (comma-separated)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)} (comma-separated)")
    parser.add_argument("--fused-configs", default="", help="the fused sweep's launches instead of its grid: "
                        "BLOCK_M,BLOCK_N,BLOCK_K,SPLITS,WARPS,STAGES;...")
    parser.add_argument("--mma-configs", default="", help="the tensor-core sweep's launches instead of its grid: "
                        "BLOCK_N,BLOCK_M,STEP_WORDS,SPLITS,WARPS,STAGES;...")
    args = parser.parse_args()
    swept = set(filter(None, args.sweep.split(",")))
    if swept - {"fused", "gemv", "mma", "skinny"}:
        parser.error(f"--sweep: unknown kernels {sorted(swept - {'fused', 'gemv', 'mma', 'skinny'})}")
    if unknown := set(args.shapes.split(",")) - set(SHAPES):
        parser.error(f"--shapes: unknown {sorted(unknown)}")
    fused_configs = [tuple(int(v) for v in c.split(",")) for c in args.fused_configs.split(";") if c]
    mma_configs = [tuple(int(v) for v in c.split(",")) for c in args.mma_configs.split(";") if c]
    if any(len(c) != 6 for c in fused_configs + mma_configs):
        parser.error("--fused-configs, --mma-configs: six numbers per launch")
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        dense, q, fp8, i8 = layers(k, n)
        print(f"{name}: K={k} N={n}")
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            base = graph_time_us(lambda: F.linear(x, dense))
            print(f" rows {m}")
            print(row("bf16 cuBLAS", base, 2 * k * n, base))
            # The fused kernel at any row count (its heuristic launch), so that FUSED_MAX_ROWS can be read off.
            gemv = m <= wna16.GEMV_MAX_ROWS
            us = graph_time_us(lambda: wna16.wna16_linear(x, *q, 4, None, 128, fused_max_rows=max(m, 1)))
            chosen = wna16._gemv_config(k, n, DEV) if gemv else wna16._fused_config(m, k, n)
            print(row(f"w4a16 {'gemv' if gemv else 'fused'} {chosen}", us, k * n // 2, base))
            if "gemv" in swept and gemv:
                us, config = sweep_gemv(x, q)
                print(row(f"w4a16 gemv best {config}", us, k * n // 2, base))
            if "fused" in swept:
                us, config = sweep(x, q, k, n, fused_configs)
                print(row(f"w4a16 fused best {config}", us, k * n // 2, base))
            # The tensor-core kernel (its default launch), checked against the dequantize + cuBLAS path's output.
            expected = wna16.wna16_linear(x, *q, 4, None, 128, fused_max_rows=0).float()
            error = (wna16.wna16_linear(x, *q, 4, None, 128, mma_config=wna16._mma_config(m, k, n)).float()
                     - expected).abs().max().item()
            us = graph_time_us(lambda: wna16.wna16_linear(x, *q, 4, None, 128, mma_config=wna16._mma_config(m, k, n)))
            print(row(f"w4a16 mma {wna16._mma_config(m, k, n)} err {error:.2g}", us, k * n // 2, base))
            if "mma" in swept:
                us, config = sweep_mma(x, q, mma_configs)
                print(row(f"w4a16 mma best {config}", us, k * n // 2, base))
            if m > wna16.GEMV_MAX_ROWS:  # what the fused kernel must beat for FUSED_MAX_ROWS to be worth its rows
                print(row("w4a16 dequantize + cuBLAS", graph_time_us(
                    lambda: wna16.wna16_linear(x, *q, 4, None, 128, fused_max_rows=0)), k * n // 2, base))
            print(row("fp8 w8a8 (quantize + GEMM)", graph_time_us(
                lambda: w8a8.w8a8_linear(x, fp8[0], fp8[1], None)), k * n, base))
            if m <= w8a8.SKINNY_MAX_ROWS:
                xq, xs = act_quant.quantize_activations(x, torch.float8_e4m3fn)
                print(row("  fp8 skinny kernel alone", graph_time_us(
                    lambda: w8a8.w8a8_skinny(xq, fp8[0], xs, fp8[1], None, x.dtype)), k * n, base))
                if "skinny" in swept:
                    for name, w8 in (("fp8", fp8), ("int8", i8)):
                        us, config = sweep_skinny(x, w8)
                        print(row(f"  {name} skinny best {config}", us, k * n, base))
            print(row("  fp8 quantize (Triton)", graph_time_us(
                lambda: act_quant.quantize_activations(x, torch.float8_e4m3fn)), k * n, base))
            print(row("  fp8 quantize (torch ops)", graph_time_us(
                lambda: reference.quantize_activations(x, torch.float8_e4m3fn)), k * n, base))
            xq, xs = act_quant.quantize_activations(x, torch.float8_e4m3fn)
            print(row("  _scaled_mm alone", graph_time_us(lambda: torch._scaled_mm(
                xq, fp8[0].t(), scale_a=xs, scale_b=fp8[1].view(1, n), out_dtype=torch.bfloat16)), k * n, base))
            print(row("int8 w8a8 (quantize + GEMM)", graph_time_us(
                lambda: w8a8.w8a8_linear(x, i8[0], i8[1], None)), k * n, base))
            azp_adj = i8[0].sum(dim=1, dtype=torch.int32)
            print(row("int8 w8a8 asymmetric (+ zero points)", graph_time_us(
                lambda: w8a8.w8a8_linear(x, i8[0], i8[1], None, azp_adj=azp_adj)), k * n, base))
            print(row("  int8 asymmetric quantize (Triton)", graph_time_us(
                lambda: act_quant.quantize_activations_asym(x)), k * n, base))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
