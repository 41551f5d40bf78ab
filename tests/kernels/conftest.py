"""Kernel tests run the Triton kernels: on a CUDA device for real, elsewhere under the Triton interpreter.

TRITON_INTERPRET is read when a @triton.jit function is *defined* (at import of kernels.<module>), so it is set here,
when pytest imports this conftest, before the test module of this folder imports the kernels. Should a test module
collected earlier have imported a kernel module already, that module is reloaded so its kernels are defined again
under the interpreter. Without CUDA nothing else in the process runs Triton (the engine uses the torch references).
"""

import importlib
import os
import sys

import torch

KERNEL_MODULES = ("engine.kernels.attention", "engine.kernels.kv_store", "engine.kernels.norm", "engine.kernels.activation",
                  "engine.kernels.rotary", "engine.kernels.lora", "engine.kernels.gemv", "engine.kernels.split_k",
                  "engine.kernels.wna16",  # after split_k: it binds split_k's functions
                  "engine.kernels.act_quant", "engine.kernels.gguf",
                  "engine.kernels.w8a8")  # after act_quant: it binds act_quant's launchers

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for _name in KERNEL_MODULES:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime.interpreter import InterpretedFunction

    from sm90_compile import LAUNCHES, describe, recorded_only

    _run = InterpretedFunction.run

    def _recording_run(self, *args, grid, warmup, **kwargs):
        launch = describe(self.fn, args, kwargs)
        if launch is not None:
            LAUNCHES.append(launch)
        if recorded_only():
            return None
        return _run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = _recording_run
