"""Start-up progress: a bar per tensor read and per KV layer allocated when stderr is a terminal, none otherwise, and
in both cases a log line with the totals."""

import io
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import EngineConfig
from engine.kv_memory import KVMemory
from engine.models.config import ModelConfig
from engine.models.loader import load_model


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def load(path: str, stderr, monkeypatch):
    monkeypatch.setattr("sys.stderr", stderr)
    config = ModelConfig.from_pretrained(path, dtype="float32")
    model = load_model(config, path, torch.device("cpu"))
    kv = KVMemory(EngineConfig(model=path, device="cpu"), config, model, torch.device("cpu"))
    kv.allocate(8)
    return model, kv


def test_a_terminal_sees_bars_and_the_log_the_totals(tiny_model, monkeypatch, caplog):
    path = tiny_model("llama")
    terminal = Terminal()
    with caplog.at_level(logging.INFO, logger="kvbox.engine"):
        model, _ = load(path, terminal, monkeypatch)
    with safe_open(next(Path(path).glob("*.safetensors")), framework="pt") as checkpoint:
        tensors = [checkpoint.get_tensor(name) for name in checkpoint.keys()]  # noqa: SIM118 - safe_open is no dict
    num_bytes = sum(t.numel() * t.element_size() for t in tensors)
    shown = terminal.getvalue()  # a fast load shows its bars' start; they are cleared when done
    assert f"loading {Path(path).name}:" in shown and f"0/{len(tensors)} [" in shown and "tensor/s" in shown, shown
    num_layers = len(model.attention_layers())
    assert "allocating the KV cache:   0%|" in shown and f"0/{num_layers} [" in shown, shown
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("read ")]
    assert line.startswith(f"read {len(tensors)} tensors ({num_bytes / 2**30:.2f} GiB) from {path} in ")
    assert all(layer.kv_cache.shape[1] == 8 for layer in model.attention_layers())


def test_no_bar_when_stderr_is_no_terminal(tiny_model, monkeypatch, caplog):
    pipe = io.StringIO()
    with caplog.at_level(logging.INFO, logger="kvbox.engine"):
        load(tiny_model("llama"), pipe, monkeypatch)
    assert pipe.getvalue() == ""
    assert any(r.getMessage().startswith("read ") for r in caplog.records)
