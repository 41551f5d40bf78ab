"""The linear method in effect while a model is built.

The loader builds a model inside `building_with(method)`; each linear asks `current_linear_method()` as it is
constructed, so the model files only wire layers and never see a quantization format. Outside that block (tests
that build layers directly, the float path) linears are unquantized.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from engine.quantization.base import LinearMethod
from engine.quantization.unquantized import UnquantizedLinearMethod

UNQUANTIZED = UnquantizedLinearMethod()
_active: list[LinearMethod] = [UNQUANTIZED]


def current_linear_method() -> LinearMethod:
    return _active[-1]


@contextmanager
def building_with(method: LinearMethod) -> Iterator[None]:
    _active.append(method)
    try:
        yield
    finally:
        _active.pop()
