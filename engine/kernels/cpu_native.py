"""The CPU decode attention in C (`cpu_decode_attention.c`): its build, its launcher, and its torch reference.

Decode attention is where a batched CPU decode step went (35-40% of a 32-sequence step of SmolLM2-135M in bf16):
torch has no paged attention, so the torch path gathers every sequence's blocks, widens them to float32 and runs
SDPA, whose CPU kernel is built for long query tiles, not one query row. The C kernel reads the blocks in place.

It is compiled on first use with the machine's C compiler (`$CC`, else `cc`), for this CPU (`-march=native`), into
kvbox's cache folder under a name that digests the source, the compiler and the CPU's flags, so a later start loads
it at once and another CPU builds its own. No compiler, no cache folder, or a failed build: the torch path serves,
with one warning. `KVBOX_CPU_NATIVE=0` turns the kernel off (A/B measurements, or to rule it out).
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
from engine.kernels import reference

logger = logging.getLogger("kvbox.engine")

SOURCE = Path(__file__).with_name("cpu_decode_attention.c")
ENV_VAR = "KVBOX_CPU_NATIVE"
# Reassociating float sums lets the compiler reduce a dot product as a tree of vector adds rather than sixteen
# scalar adds in order; the torch path sums in yet another order, so neither is the reference to the bit.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-shared",
         "-fPIC")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_c_int64, _ptr = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (_ptr, _ptr, _ptr, _ptr, ctypes.c_int, _ptr, _c_int64, _ptr, _ptr, _ptr, _c_int64, _c_int64, _c_int64,
             _c_int64, _c_int64, _c_int64, ctypes.c_float, _c_int64, _c_int64, _c_int64, ctypes.c_int)


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1") != "0"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (logged once) where it cannot be built or loaded."""
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        logger.warning("CPU decode attention: the C kernel is unavailable (%s); the torch path serves", exc)
        return None
    lib.decode_attention.argtypes = _ARGTYPES
    lib.decode_attention.restype = ctypes.c_int
    return lib


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or $CC)")
    root = cache_root()
    if root is None:
        raise RuntimeError("no cache folder to build into")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (compiler, version, platform.machine(), _cpu_flags(), " ".join(FLAGS)):
        digest.update(b"\0" + part.encode())
    path = root / "native" / f"cpu_decode_attention-{digest.hexdigest()[:16]}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: engines starting together never load a half-written library.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], capture_output=True,
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


def supports(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
             out: torch.Tensor) -> bool:
    """Whether the C kernel takes these tensors (and is built); else the caller keeps the torch path."""
    return (query.dtype in _DTYPES and key_cache.dtype == query.dtype and out.dtype == query.dtype
            and query.device.type == "cpu" and key_cache.is_contiguous() and value_cache.is_contiguous()
            and out.is_contiguous() and query.stride(2) == 1 and query.stride(1) == query.shape[2]
            and block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 and enabled()
            and library() is not None)


def decode_attention(query, key_cache, value_cache, block_tables, seq_lens, seqs: torch.Tensor, rows: torch.Tensor,
                     max_len: int, scale: float, sliding_window: int, out: torch.Tensor) -> None:
    """out[rows[i]] = attention of query[rows[i]] over sequence seqs[i]'s cached keys (one query per sequence, the
    last position); `max_len`: the most keys any of them sees. Callers check `supports` first. seqs and rows are
    contiguous int64, seq_lens contiguous int32."""
    num_heads, head_size = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    status = library().decode_attention(
        out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), _DTYPES[query.dtype],
        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), seqs.data_ptr(), rows.data_ptr(),
        seqs.numel(), num_heads, num_kv_heads, head_size, block_size, max_len, scale, sliding_window,
        query.stride(0), out.stride(0), torch.get_num_threads())
    if status != 0:
        raise MemoryError("CPU decode attention: no scratch memory")


def decode_attention_reference(query, key_cache, value_cache, block_tables, seq_lens, seqs, rows, max_len, scale,
                               sliding_window, out) -> None:
    """The same through `reference.paged_attention`, one decoding sequence at a time."""
    for seq, row in zip(seqs.tolist(), rows.tolist()):
        reference.paged_attention(query[row:row + 1], key_cache, value_cache, block_tables[seq:seq + 1],
                                  seq_lens[seq:seq + 1], torch.tensor([0, 1], dtype=torch.int32), scale,
                                  sliding_window, out=out[row:row + 1])
