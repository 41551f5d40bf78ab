"""Builds a model from a `ModelConfig` and fills its parameters: from a folder's safetensors (one file, or shards
listed in `model.safetensors.index.json`), from a GGUF file (`gguf.py`) or, for benchmarks at real shapes, with
deterministic random weights. The linears are built with the model's linear method (`engine.quantization`), which
turns the loaded tensors into their runtime layout once everything is in.

Tensors are read one at a time (memory-mapped) and copied into the already-allocated parameters by each
parameter's own weight_loader, so a checkpoint never sits in memory twice; a pipeline stage reads only its own
tensors. Pickled `.bin` checkpoints are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.distributed.pipeline import PipelineStage
from engine.models.builtin import resolve_model_source
from engine.models.config import ModelConfig
from engine.models.gguf import is_gguf, iter_gguf_tensors
from engine.models.layers import LMHead, VocabEmbedding
from engine.models.registry import get_model_class
from engine.progress import progress
from engine.quantization.context import UNQUANTIZED, building_with
from engine.quantization.gguf import dequantize_at_load
from engine.quantization.methods import keep_float_linears, linear_method_for
from engine.quantization.outliers import keep_outliers_online
from engine.quantization.smoothing import smooth_online
from engine.quantization.spec import (
    QuantizationConfigError,
    QuantScheme,
    check_linear_shapes,
    parse_quantization,
)

logger = logging.getLogger("kvbox.engine")

LOAD_FORMATS = ("auto", "safetensors", "dummy")
_INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_DUMMY_STD = 0.02
_DUMMY_SEED = 0


def load_model(config: ModelConfig, path: str | Path, device: torch.device, load_format: str = "auto",
               task: str = "generate", quantization: str | None = None, tp_rank: int = 0,
               tp_size: int = 1, stage: PipelineStage | None = None, gguf_dequantize: str = "matmul",
               smoothquant_alpha: float | str | None = None, tokenizer: str | None = None,
               outlier_fraction: float | None = None) -> nn.Module:
    """The model that runs `config.architecture` for `task`, in `config.dtype` on `device`, weights loaded, in eval
    mode; its linears quantized as the checkpoint's quantization_config says, or online by `quantization` (fp8,
    int8); with `tp_size` > 1, rank `tp_rank`'s shard of it (each parameter's loader cuts its shard from the full
    tensors); given a pipeline `stage`, only that stage's layers. A GGUF's blocks stay packed unless
    `gguf_dequantize` is "load". Online quantization smooths the float weights first with `smoothquant_alpha`
    ("auto": the type's default; None: not) and keeps `outlier_fraction` of each linear's input channels in float
    (None: none), calibrating on `tokenizer`'s (default: `path`'s) tokens, where the model is whole on one rank."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {', '.join(LOAD_FORMATS)}")
    model_cls = get_model_class(config.architecture, task)
    scheme = model_quantization(config, path, quantization, task)
    check_device_runs(scheme, device, path)
    # Allocating straight in the target dtype and device avoids a float32 CPU copy of the whole model.
    with _default_dtype(config.dtype), torch.device(device), building_with(linear_method_for(scheme)):
        # Only the generation families shard (pooling models refuse tensor and pipeline parallelism at config time).
        model = (model_cls(config) if tp_size == 1 and stage is None
                 else model_cls(config, tp_rank, tp_size, stage))
        keep_float_linears(model, scheme)
    if load_format == "dummy":
        _fill_dummy(model)
    else:
        source = resolve_model_source(path)
        keep = model.holds_weight if stage is not None else None
        tensors = iter_gguf_tensors(source, config) if is_gguf(source) else iter_safetensors(source, keep)
        counter = _TensorCounter(tensors)
        total = None if is_gguf(source) else _num_tensors(source)
        model.load_weights(progress(counter, f"loading {Path(source).name}", "tensor", total))
        logger.info("read %d tensors (%.2f GiB) from %s in %.1f s", counter.num_tensors, counter.num_bytes / 2**30,
                    source, time.perf_counter() - counter.start)
    if scheme is not None and scheme.online and tp_size == 1 and stage is None:
        if load_format != "dummy":
            smooth_online(model, scheme.layout, smoothquant_alpha, tokenizer or str(path))
        keep_outliers_online(model, outlier_fraction, tokenizer or str(path), load_format == "dummy")
    elif outlier_fraction and scheme is not None and scheme.online:  # the calibration needs the whole model
        logger.warning("outlier_fraction %s is not applied across several ranks or stages", outlier_fraction)
    elif outlier_fraction:  # a float model served as it is, or a checkpoint quantized already
        logger.warning("outlier_fraction %s is not applied: only quantization fp8 or int8 of a float checkpoint "
                       "keeps channels in float", outlier_fraction)
    for module in model.modules():
        if hasattr(module, "quant_method"):
            module.quant_method.process_weights_after_loading(module)
    if scheme is not None and scheme.method == "gguf" and gguf_dequantize == "load":
        dequantize_at_load(model, config.dtype)
        scheme = None
    _pack_lm_heads(model)
    model.quant_scheme = scheme
    return model.eval()


def model_quantization(config: ModelConfig, path: str | Path, quantization: str | None,
                       task: str = "generate") -> QuantScheme | None:
    """The scheme the model runs; a setting kvbox cannot run fails here, naming the model, the key and the value."""
    try:
        scheme = parse_quantization(config.quantization_config, quantization,
                                    config.num_layers if task == "generate" else None)
        check_linear_shapes(scheme, config.num_layers, config.hidden_size, config.intermediate_size,
                            config.num_heads * config.head_size, config.num_kv_heads * config.head_size)
        return scheme
    except QuantizationConfigError as error:
        raise QuantizationConfigError(error.key, error.value, f"{error.problem} (model {path})") from None


def check_device_runs(scheme: QuantScheme | None, device: torch.device, path: str | Path) -> None:
    """FP8 activations need FP8 tensor cores (compute capability 8.9: Ada, Hopper); older GPUs are refused before
    anything is allocated, rather than failing at the first forward."""
    if scheme is None or scheme.layout != "fp8" or scheme.activations is None or device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        key, value = ("quantization", "fp8") if scheme.online else ("quantization_config.quant_method", scheme.method)
        raise QuantizationConfigError(key, value, f"FP8 W8A8 needs compute capability 8.9 or newer (Ada, Hopper); "
                                      f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]} "
                                      f"(model {path})")


def safetensors_files(path: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards named by the index file, else every *.safetensors."""
    folder = Path(path)
    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise ValueError(f"{folder} holds only pickled weights ({', '.join(pickles)}); kvbox loads safetensors only "
                         "because unpickling runs arbitrary code. Convert the checkpoint to safetensors first.")
    raise FileNotFoundError(f"no *.safetensors weights in {folder}")


def iter_safetensors(path: str | Path, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one tensor in memory at a time; the weight loaders move them to the device. `keep`:
    which names to read (None: all)."""
    for file in safetensors_files(path):
        # safetensors' own message ("incomplete metadata, file not fully covered") names neither the file nor
        # the likely cause, a download cut short.
        try:
            f = safe_open(file, framework="pt", device="cpu")
            names = list(f.keys())
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e}); is the checkpoint complete?") from None
        for name in names if keep is None else filter(keep, names):
            try:
                tensor = f.get_tensor(name)
            except SafetensorError as e:
                raise ValueError(f"{file}: tensor {name!r} is unreadable ({e}); is the checkpoint complete?") from None
            yield name, tensor


class _TensorCounter:
    """Passes the checkpoint's (name, tensor) pairs on, counting them and their bytes for the log line."""

    def __init__(self, tensors: Iterable[tuple[str, torch.Tensor]]):
        self.tensors, self.num_tensors, self.num_bytes = tensors, 0, 0
        self.start = time.perf_counter()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.tensors:
            self.num_tensors += 1
            self.num_bytes += tensor.numel() * tensor.element_size()
            yield name, tensor


def _num_tensors(path: str | Path) -> int | None:
    """How many tensors the safetensors files hold (their headers only), for the bar's total."""
    try:
        return sum(len(safe_open(file, framework="pt", device="cpu").keys()) for file in safetensors_files(path))
    except (OSError, ValueError, SafetensorError):
        return None  # iter_safetensors reports the problem


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _pack_lm_heads(model: nn.Module) -> None:
    embeddings = [m.weight for m in model.modules() if type(m) is VocabEmbedding]
    for module in model.modules():
        if isinstance(module, LMHead):
            module.pack(shared=any(module.weight is weight for weight in embeddings))


def weight_bytes(model: nn.Module) -> int:
    """What the model's weights hold in memory (parameters and buffers, packed as they run)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def _fill_dummy(model: nn.Module) -> None:
    """Float matrices get small normal noise from a fixed seed; vectors keep their init (unit norms, zero biases)
    so the activations stay in a realistic range. A quantized linear's method fills its own tensors (random packed
    values, scales that give weights of the same spread), so benchmarks run every format at real shapes."""
    generator, seen = None, set()
    for module in model.modules():
        method = getattr(module, "quant_method", UNQUANTIZED)
        params = [p for name, p in module.named_parameters(recurse=False) if name != "bias" and id(p) not in seen]
        seen.update(map(id, params))
        if generator is None and params:
            generator = torch.Generator(device=params[0].device).manual_seed(_DUMMY_SEED)
        if method is not UNQUANTIZED:
            method.fill_dummy(module, generator, _DUMMY_STD)
            continue
        for param in params:
            if param.dim() >= 2:
                param.normal_(0.0, _DUMMY_STD, generator=generator)
