"""CPU kernels in C: their build and their launchers. Their torch references are the `kernels.reference` ops they
stand in for; the fast paths in `kernels.cpu` call these where `supports_*` says they take the tensors.

- `cpu_decode_attention.c`: decode attention over the paged cache, read in place. torch has no paged attention, so
  the torch path gathers every sequence's blocks, widens them to float32 and runs SDPA, whose CPU kernel is built
  for long query tiles, not one query row: 35-40% of a 32-sequence decode step of SmolLM2-135M in bf16.
- `cpu_prefill_attention.c`: causal attention of prefill rows over the paged cache, read in place: the torch path's
  SDPA ran SmolLM2's 128-token prefills at 40-50 GFLOP/s, 14-23% of a bf16 prefill step.
- `cpu_norm_rope.c`: RMSNorm with its residual add, and RoPE with the K/V store, one pass per row where torch runs
  five to ten small ops.
- `cpu_activation.c`: SwiGLU's silu(gate) * up in one pass over each row, where torch makes two.
- `cpu_packed_linear.c`: float32 and bf16 linears from a weight packed at load into panels of 16 output channels,
  at the memory's bandwidth for one row (MKL's sgemm read 11-15 GB/s of 28, oneDNN's bf16 head 10) and at the FMA
  rate from a few rows on.
- `cpu_gguf.c`: GGUF blocks dequantized a chunk of a linear's rows at a time into those panels, or for a few
  float32 rows a block at a time into registers (`kernels.cpu.gguf_linear`), where the torch reference made ten
  passes over float32 copies of the whole layer.

Each is compiled on first use with the machine's C compiler (`$CC`, else `cc`), for this CPU (`-march=native`),
into kvbox's cache folder under a name that digests the source, the flags, the compiler and the CPU's flags, so a
later start loads it at once and another CPU builds its own. No compiler, no cache folder, or a failed build: the
torch paths serve, with one warning. `KVBOX_CPU_NATIVE=0` turns them off (A/B measurements, or to rule them out).

OpenMP: the libraries link libgomp.so.1 by its soname, and torch has loaded its own libgomp.so.1 first, so both
share one runtime and one thread pool (two pools would spin against each other on the same cores); the thread
count passed in is torch's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from engine.cache_dir import cache_root

logger = logging.getLogger("kvbox.engine")

ENV_VAR = "KVBOX_CPU_NATIVE"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_c_int64, _ptr, _c_int, _c_float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# Reassociated float sums: a dot product reduces as a tree of vector adds instead of sixteen scalar adds in order
# (the torch paths sum in yet other orders, so neither is the reference to the bit).
_REASSOCIATE = ("-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
# source name -> (its own flags, {function: (argument types, result type)})
SOURCES = {
    "decode_attention": (_REASSOCIATE, {
        "decode_attention": ((_ptr, _ptr, _ptr, _ptr, _c_int, _ptr, _c_int64, _ptr, _ptr, _ptr, _c_int64, _c_int64,
                              _c_int64, _c_int64, _c_int64, _c_int64, _c_float, _c_int64, _c_int64, _c_int64,
                              _c_int64, _c_int), _c_int)}),
    # gcc turned the kernel's row copies (16 floats a step) into calls of libc's memcpy: 256 bytes a call, 18% of the
    # kernel's time at head size 64.
    "prefill_attention": (("-fno-trapping-math", "-fno-tree-loop-distribute-patterns"), {
        "prefill_attention": ((_ptr, _ptr, _ptr, _ptr, _c_int, _ptr, _c_int64, _ptr, _ptr, _ptr, _ptr, _c_int64,
                               _c_int64, _c_int64, _c_int64, _c_int64, _c_float, _c_int64, _c_int64, _c_int64,
                               _c_int), _c_int)}),
    "packed_linear": ((), {
        "packed_linear": ((_ptr, _ptr, _ptr, _ptr, _c_int, _c_int64, _c_int64, _c_int64, _c_int64, _c_int64, _c_int),
                          None),
        "packed_linear_has_bf16": ((), _c_int)}),
    # No fused multiply-adds: each value rounds as the reference's separate product and sum.
    "gguf": (("-ffp-contract=off",), {
        "gguf_supported": ((_c_int,), _c_int),
        "gguf_dequantize": ((_ptr, _ptr, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int, _c_int), _c_int),
        "gguf_matvec_rows": ((), _c_int),
        "gguf_matvec": ((_ptr, _ptr, _ptr, _c_int, _c_int64, _c_int64, _c_int64, _c_int64, _c_int64, _c_int64, _c_int),
                        None)}),
    # -fno-trapping-math lets gcc vectorize the exp's clamp and rounding (without it, it keeps them scalar).
    "activation": (("-fno-trapping-math",), {
        "silu_and_mul": ((_ptr, _ptr, _c_int, _c_int64, _c_int64, _c_int64, _c_int64, _c_int), None)}),
    # No fused multiply-adds: RoPE's x1 cos - x2 sin then rounds as torch's two products and a difference do.
    "norm_rope": (("-ffp-contract=off", "-fno-trapping-math"), {
        "rms_norm": ((_ptr, _ptr, _ptr, _ptr, _ptr, _c_int, _c_int64, _c_int64, _c_int64, _c_int64, _c_float,
                      _c_float, _c_int), None),
        "rotary_store_kv": ((_ptr, _ptr, _ptr, _ptr, _ptr, _c_int, _ptr, _ptr, _ptr, _c_int64, _c_int64, _c_int64,
                             _c_int64, _c_int64, _c_int64, _c_int64, _c_int), None)}),
}
# Included by the sources that share its helpers; part of every source's digest.
HEADER = Path(__file__).with_name("cpu_common.h")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Decode attention on bfloat16 caches takes all of a sequence's KV heads in one task from this many sequences a thread
# on; below it, a KV head a task, so that the threads have tasks to share. Measured on the tile path (SmolLM2's heads,
# 32 sequences of 160 and 400 cached tokens, 30 layers' caches cold, 2 threads, three runs): bfloat16 8-18% faster a
# sequence a task, float32 0-5% slower, so float32 keeps a task a head; end to end (bench/cpu_peer.py, bf16, the two
# alternated) 373.6 / 375.4 against 365.7 / 365.9 out tok/s. With the register paths the two are within 3%.
_SEQS_PER_THREAD = 4
_WHOLE_SEQUENCE_DTYPES = (torch.bfloat16,)


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1") != "0"


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The compiled `cpu_<name>.c`, or None (logged once) where it cannot be built or loaded."""
    extra_flags, functions = SOURCES[name]
    try:
        lib = ctypes.CDLL(str(_build(name, extra_flags)))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        logger.warning("CPU kernels in C (%s) are unavailable (%s); the torch path serves", name, exc)
        return None
    for function, (argtypes, restype) in functions.items():
        getattr(lib, function).argtypes = argtypes
        getattr(lib, function).restype = restype
    return lib


def _build(name: str, extra_flags: tuple[str, ...]) -> Path:
    source = Path(__file__).with_name(f"cpu_{name}.c")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or $CC)")
    root = cache_root()
    if root is None:
        raise RuntimeError("no cache folder to build into")
    flags = (*FLAGS, *extra_flags)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    digest = hashlib.sha256(source.read_bytes() + b"\0" + HEADER.read_bytes())
    for part in (compiler, version, platform.machine(), _cpu_flags(), " ".join(flags)):
        digest.update(b"\0" + part.encode())
    path = root / "native" / f"cpu_{name}-{digest.hexdigest()[:16]}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: engines starting together never load a half-written library.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        result = subprocess.run([compiler, *flags, "-o", str(built), str(source), "-lm"], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, path)
    return path


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _usable(name: str, *tensors: torch.Tensor) -> bool:
    """All on the CPU in one dtype the kernels know, and the library built."""
    dtype = tensors[0].dtype
    return (dtype in _DTYPES and all(t.dtype == dtype and t.device.type == "cpu" for t in tensors) and enabled()
            and library(name) is not None)


def supports_decode_attention(query, key_cache, value_cache, block_tables, out) -> bool:
    return (key_cache.is_contiguous() and value_cache.is_contiguous() and out.is_contiguous()
            and query.stride(2) == 1 and query.stride(1) == query.shape[2]
            and block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
            and _usable("decode_attention", query, key_cache, value_cache, out))


def decode_attention(query, key_cache, value_cache, block_tables, seq_lens, seqs: torch.Tensor, rows: torch.Tensor,
                     max_len: int, scale: float, sliding_window: int, out: torch.Tensor,
                     heads_per_task: int | None = None) -> None:
    """out[rows[i]] = attention of query[rows[i]] over sequence seqs[i]'s cached keys (one query per sequence, the
    last position); `max_len`: the most keys any of them sees. seqs and rows are contiguous int64, seq_lens
    contiguous int32. A task takes `heads_per_task` KV heads of a sequence (a divisor of their number); by default
    all of them for bfloat16 once the sequences give every thread several tasks, else one."""
    num_heads, head_size = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    threads = torch.get_num_threads()
    if heads_per_task is None:
        whole = query.dtype in _WHOLE_SEQUENCE_DTYPES and seqs.numel() >= _SEQS_PER_THREAD * threads
        heads_per_task = num_kv_heads if whole else 1
    if num_kv_heads % heads_per_task:
        raise ValueError(f"heads_per_task {heads_per_task} does not divide {num_kv_heads} KV heads")
    status = library("decode_attention").decode_attention(
        out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), _DTYPES[query.dtype],
        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), seqs.data_ptr(), rows.data_ptr(),
        seqs.numel(), num_heads, num_kv_heads, head_size, block_size, max_len, scale, sliding_window,
        query.stride(0), out.stride(0), heads_per_task, threads)
    if status != 0:
        raise MemoryError("CPU decode attention: no scratch memory")


def supports_prefill_attention(query, key_cache, value_cache, block_tables, out) -> bool:
    """As for decodes, and head sizes a multiple of 16 (the weighted sums run in whole vectors)."""
    return (query.shape[2] % 16 == 0 and key_cache.is_contiguous() and value_cache.is_contiguous()
            and out.is_contiguous() and query.stride(2) == 1 and query.stride(1) == query.shape[2]
            and block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
            and _usable("prefill_attention", query, key_cache, value_cache, out))


def prefill_attention(query, key_cache, value_cache, block_tables, seqs: torch.Tensor, query_starts: torch.Tensor,
                      query_lens: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int,
                      out: torch.Tensor) -> None:
    """For each i: the query_lens[i] rows from query_starts[i] of sequence seqs[i], its last positions of
    seq_lens[i], attend causally over its cached keys, into the same rows of out. The four index tensors are
    contiguous int64 of one entry per sequence."""
    num_heads, head_size = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    status = library("prefill_attention").prefill_attention(
        out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), _DTYPES[query.dtype],
        block_tables.data_ptr(), block_tables.stride(0), seqs.data_ptr(), query_starts.data_ptr(),
        query_lens.data_ptr(), seq_lens.data_ptr(), seqs.numel(), num_heads, num_kv_heads, head_size, block_size,
        scale, sliding_window, query.stride(0), out.stride(0), torch.get_num_threads())
    if status != 0:
        raise MemoryError("CPU prefill attention: no scratch memory")


# Output channels per panel of a packed weight: one AVX-512 vector of float32 sums (cpu_packed_linear.c).
PANEL = 16


def supports_packing(weight: torch.Tensor) -> bool:
    """A [out, in] weight that `pack_linear_weight` takes, with the kernel built: out a multiple of PANEL; float32,
    or bf16 with an even `in` on a CPU with AVX512_BF16 (elsewhere bf16 keeps oneDNN)."""
    if weight.dim() != 2 or weight.shape[0] % PANEL or weight.shape[0] == 0:
        return False
    if weight.dtype == torch.bfloat16:
        return weight.shape[1] % 2 == 0 and _usable("packed_linear", weight) and bool(
            library("packed_linear").packed_linear_has_bf16())
    return weight.dtype == torch.float32 and _usable("packed_linear", weight)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] -> [out / PANEL, in, PANEL]: packed[p, i, c] = weight[PANEL * p + c, i]; bf16 -> [out /
    PANEL, in / 2, PANEL, 2]: packed[p, i, c, j] = weight[PANEL * p + c, 2 * i + j] (the pairs vdpbf16ps takes)."""
    out_features, in_features = weight.shape
    weight = weight.contiguous()
    if weight.dtype == torch.bfloat16:
        return weight.view(out_features // PANEL, PANEL, in_features // 2, 2).permute(0, 2, 1, 3).contiguous()
    return weight.view(out_features // PANEL, PANEL, in_features).transpose(1, 2).contiguous()


def is_packed(weight: torch.Tensor) -> bool:
    return weight.dim() == (4 if weight.dtype == torch.bfloat16 else 3)


def unpack_linear_weight(packed: torch.Tensor) -> torch.Tensor:
    """`pack_linear_weight`'s inverse."""
    if packed.dim() == 4:
        return packed.permute(0, 2, 1, 3).reshape(packed.shape[0] * PANEL, -1)
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, unpack_linear_weight(packed), bias) for x [..., in] of the weight's dtype; into `out` [rows, out]
    if given (unit column stride: a slice of a wider output's columns)."""
    in_features = packed.shape[1] * (2 if packed.dim() == 4 else 1)
    out_features = packed.shape[0] * PANEL
    if x.dtype != packed.dtype or x.shape[-1] != in_features:
        raise ValueError(f"packed linear: x {tuple(x.shape)} {x.dtype} against {out_features}x{in_features} "
                         f"{packed.dtype}")
    x2 = x.reshape(-1, in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    out = torch.empty(x2.shape[0], out_features, dtype=x.dtype) if out is None else out
    library("packed_linear").packed_linear(
        out.data_ptr(), x2.data_ptr(), packed.data_ptr(), bias.data_ptr() if bias is not None else None,
        _DTYPES[x.dtype], x2.shape[0], out_features, in_features, x2.stride(0), out.stride(0),
        torch.get_num_threads())
    return out.view(*x.shape[:-1], out_features)


def gguf_available() -> bool:
    return enabled() and library("gguf") is not None


def supports_gguf(x: torch.Tensor, qweight: torch.Tensor, qtype: int) -> bool:
    return (qweight.dtype == torch.uint8 and qweight.dim() == 2 and qweight.is_contiguous() and _usable("gguf", x)
            and bool(library("gguf").gguf_supported(qtype)))


def gguf_dequantize(qweight: torch.Tensor, qtype: int, in_features: int, dtype: torch.dtype, panels: bool,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """GGUF rows [rows, row bytes] -> `dtype` [rows, in_features], or with `panels` (rows a multiple of PANEL)
    `pack_linear_weight`'s layout of it; into `out` (as many elements, contiguous) if given."""
    rows = qweight.shape[0]
    shape = ((rows // PANEL, in_features // 2, PANEL, 2) if dtype == torch.bfloat16 else
             (rows // PANEL, in_features, PANEL)) if panels else (rows, in_features)
    out = torch.empty(shape, dtype=dtype) if out is None else out.view(shape)
    if library("gguf").gguf_dequantize(out.data_ptr(), qweight.data_ptr(), qtype, rows, in_features,
                                       qweight.stride(0), _DTYPES[dtype], int(panels), torch.get_num_threads()):
        raise MemoryError("CPU GGUF dequantization: no scratch memory")
    return out


def gguf_matvec_rows() -> int:
    return library("gguf").gguf_matvec_rows()


def gguf_matvec(x: torch.Tensor, qweight: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """float32 x [rows <= gguf_matvec_rows(), in] times the GGUF rows' weight -> [rows, out], the weight's blocks
    dequantized in registers."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=torch.float32)
    library("gguf").gguf_matvec(out.data_ptr(), x.data_ptr(), qweight.data_ptr(), qtype, x.shape[0],
                                qweight.shape[0], in_features, qweight.stride(0), x.stride(0), out.stride(0),
                                torch.get_num_threads())
    return out


def supports_silu_and_mul(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1 and _usable("activation", x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :d]) * x[:, d:] for x [tokens, 2 d]."""
    d = x.shape[1] // 2
    out = torch.empty(x.shape[0], d, dtype=x.dtype)
    library("activation").silu_and_mul(out.data_ptr(), x.data_ptr(), _DTYPES[x.dtype], x.shape[0], d, x.stride(0),
                                       out.stride(0), torch.get_num_threads())
    return out


def supports_rms_norm(x, weight, residual=None) -> bool:
    """Rows [tokens, hidden] with their values contiguous (a residual of the same shape)."""
    rows = (x,) if residual is None else (x, residual)
    return (x.dim() == 2 and all(t.shape == x.shape and t.stride(1) == 1 for t in rows) and weight.is_contiguous()
            and _usable("norm_rope", *rows, weight))


def rms_norm(x, weight, eps: float, weight_offset: float = 0.0, residual=None):
    """reference.rms_norm(x), or with `residual`, reference.fused_add_rms_norm(x, residual): (normed, summed)."""
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=x.dtype)
    summed = torch.empty_like(out) if residual is not None else None
    library("norm_rope").rms_norm(
        out.data_ptr(), summed.data_ptr() if summed is not None else None, x.data_ptr(),
        residual.data_ptr() if residual is not None else None, weight.data_ptr(), _DTYPES[x.dtype], rows, hidden,
        x.stride(0), residual.stride(0) if residual is not None else 0, eps, weight_offset, torch.get_num_threads())
    return out if residual is None else (out, summed)


def supports_rotary_store_kv(query, key, value, cos_sin_cache, key_cache, value_cache) -> bool:
    """q, k and v as the fused qkv projection leaves them (heads contiguous, k and v rows alike), float32 cos/sin,
    caches contiguous."""
    head_size = query.shape[2]
    return (all(t.stride(2) == 1 and t.stride(1) == head_size for t in (query, key, value))
            and key.stride(0) == value.stride(0) and cos_sin_cache.dtype == torch.float32
            and cos_sin_cache.is_contiguous() and key_cache.is_contiguous() and value_cache.is_contiguous()
            and _usable("norm_rope", query, key, value, key_cache, value_cache))


def rotary_store_kv(positions, query, key, value, cos_sin_cache, key_cache, value_cache, slot_mapping) -> None:
    """reference.rotary_store_kv with neox rotation; positions and slot_mapping contiguous int64."""
    library("norm_rope").rotary_store_kv(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
        _DTYPES[query.dtype], positions.data_ptr(), slot_mapping.data_ptr(), cos_sin_cache.data_ptr(),
        query.shape[0], query.shape[1], key.shape[1], query.shape[2], cos_sin_cache.shape[1], query.stride(0),
        key.stride(0), torch.get_num_threads())
