"""Compiles, for an H100/H200 (sm_90), every distinct Triton launch the kernel tests made under the interpreter.

The interpreter runs a kernel's Python, not Triton's compiler: a module constant not marked `tl.constexpr`, an
integer `tl.dot` without `out_dtype`, a constexpr branch that returns early (Triton still compiles what follows it)
pass there and fail on the GPU at the first launch, each a lost device call (bench/RESULTS.md, thirteenth session).
Triton's compiler and ptxas need no GPU, so the conftest records each launch (kernel, argument types, constexpr
values, warps and stages) and this module, in a process without TRITON_INTERPRET (the kernels must be JIT
functions, not interpreted ones), compiles them.

    python -m tests.kernels.sm90_compile LAUNCHES.jsonl    # prints each failure; exit status 1 if any
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from collections.abc import Iterator

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int8": "i8", "uint8": "u8",
           "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1", "float8_e4m3fn": "fp8e4nv",
           "float8_e5m2": "fp8e5"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg", "launch_pdl")
LAUNCHES: list[dict] = []  # what tests/kernels/conftest.py recorded in this process
_RECORD_ONLY = [False]


def recorded_only() -> bool:
    return _RECORD_ONLY[0]


@contextlib.contextmanager
def record_only() -> Iterator[None]:
    """Launches inside are recorded, not run (their outputs stay unwritten): for types the interpreter gets wrong,
    such as float8, whose values only a GPU can check."""
    _RECORD_ONLY[0] = True
    try:
        yield
    finally:
        _RECORD_ONLY[0] = False


def describe(fn, args: tuple, kwargs: dict) -> dict | None:
    """One launch as plain data: None where an argument has a type this check does not model."""
    import torch
    import triton.language as tl

    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for name, value in bound.arguments.items():
        annotation = str(params[name].annotation)
        if "constexpr" in annotation:
            signature[name] = "constexpr"
            constexprs[name] = value if not isinstance(value, tl.dtype) else {"tl": value.name}
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPES[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name], constexprs[name] = "constexpr", None
        else:
            return None
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": {k: kwargs[k] for k in _OPTIONS if k in kwargs}}


# Constexprs the launchers set from TRITON_INTERPRET: the GPU's value, or both where a dtype decides it there too.
_ON_GPU = {"INTERPRET": (False,), "F32_DOT": (False, True), "IEEE_DOT": (False, True)}


def gpu_variants(launch: dict) -> list[dict]:
    variants = [launch]
    for name, values in _ON_GPU.items():
        if name in launch["constexprs"]:
            variants = [{**v, "constexprs": {**v["constexprs"], name: value}} for v in variants for value in values]
    return variants


def compile_all(launches: list[dict]) -> tuple[list[str], int]:
    """Compiles each distinct launch for sm_90 (as the GPU would launch it: `gpu_variants`), a process per core;
    returns one line per failure and how many were compiled."""
    from concurrent.futures import ProcessPoolExecutor

    distinct = list({json.dumps(v, sort_keys=True): v for launch in launches for v in gpu_variants(launch)}.values())
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [failure for failure in pool.map(compile_one, distinct, chunksize=8) if failure]
    return failures, len(distinct)


def compile_one(launch: dict) -> str | None:
    """None, or what the compiler said about `launch`."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    while not isinstance(kernel, JITFunction):  # an autotuner's or heuristics' wrapped function
        kernel = kernel.fn
    constexprs = {name: getattr(tl, value["tl"]) if isinstance(value, dict) else value
                  for name, value in launch["constexprs"].items()}
    try:
        triton.compile(ASTSource(kernel, launch["signature"], constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=launch["options"])
    except Exception as error:  # noqa: BLE001 - every compiler failure is a finding
        cause = error.__cause__ or error
        return (f"{launch['module']}.{launch['kernel']} {launch['constexprs']} {launch['options']}: "
                f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:400]}")
    return None


if __name__ == "__main__":
    with open(sys.argv[1]) as lines:
        found, compiled = compile_all([json.loads(line) for line in lines])
    print("\n".join(found) or f"{compiled} launches compiled for sm_90")
    sys.exit(1 if found else 0)
