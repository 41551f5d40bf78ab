"""The linear method that runs a `QuantScheme`, chosen once per model at load."""

from __future__ import annotations

from engine.quantization.context import UNQUANTIZED
from engine.quantization.awq import AWQLinearMethod
from engine.quantization.base import LinearMethod
from engine.quantization.compressed_tensors import PackQuantizedLinearMethod
from engine.quantization.gguf import GGUFLinearMethod
from engine.quantization.gptq import GPTQLinearMethod
from engine.quantization.spec import QuantScheme
from engine.quantization.w8a8 import W8A8LinearMethod

_METHODS = {
    "gptq": GPTQLinearMethod,
    "awq": AWQLinearMethod,
    "pack": PackQuantizedLinearMethod,
    "fp8": W8A8LinearMethod,
    "int8": W8A8LinearMethod,
    "gguf": GGUFLinearMethod,
}


def linear_method_for(scheme: QuantScheme | None) -> LinearMethod:
    return UNQUANTIZED if scheme is None else _METHODS[scheme.layout](scheme)
