"""The remembered tokenizer class (engine.tokenizer): a second load of a folder takes the class AutoTokenizer chose
the first time, without AutoTokenizer, and the tokenizer it gives behaves the same."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from engine import tokenizer as tokenizer_module
from engine.tokenizer import load_tokenizer, render_chat
from engine.tools.tiny_model import ALL_FAMILIES, build_tiny_model

TEXTS = ["Hello world, 12345!", "  spaced   out\ttabs\nand lines ", "日本語 🙂 ünïcödé", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBOX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _forbid_auto_tokenizer(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer was asked although the class was remembered")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


def _same_behaviour(first, second):
    assert type(first) is type(second)
    for text in TEXTS:
        assert second.encode(text) == first.encode(text)
        assert second.encode(text, add_special_tokens=False) == first.encode(text, add_special_tokens=False)
        ids = first.encode(text)
        assert second.decode(ids, skip_special_tokens=True) == first.decode(ids, skip_special_tokens=True)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id",
                 "model_max_length", "chat_template", "all_special_tokens"):
        assert getattr(second, name) == getattr(first, name), name
    assert len(second) == len(first)
    assert second.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()
    if first.chat_template is not None:
        assert render_chat(second, MESSAGES) == render_chat(first, MESSAGES)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_second_load_takes_the_remembered_class(family, tmp_path, cache_dir, monkeypatch):
    folder = build_tiny_model(family, tmp_path / family)
    first = load_tokenizer(str(folder))
    entries = json.loads((cache_dir / "tokenizer_classes.json").read_text())
    assert list(entries.values()) == [f"{type(first).__module__}:{type(first).__qualname__}"]
    _forbid_auto_tokenizer(monkeypatch)
    _same_behaviour(first, load_tokenizer(str(folder)))


def test_changed_config_files_ask_autotokenizer_again(tmp_path, cache_dir, monkeypatch):
    folder = build_tiny_model("llama", tmp_path / "llama")
    load_tokenizer(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "model_max_length": 77}))
    asked = []
    original = AutoTokenizer.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spy))
    assert load_tokenizer(str(folder)).model_max_length == 77
    assert asked == [str(folder)]
    assert len(json.loads((cache_dir / "tokenizer_classes.json").read_text())) == 2


def test_a_copied_folder_is_a_new_key(tmp_path, cache_dir, monkeypatch):
    folder = build_tiny_model("qwen2", tmp_path / "a")
    load_tokenizer(str(folder))
    copy = shutil.copytree(folder, tmp_path / "b")
    calls = []
    monkeypatch.setattr(tokenizer_module, "_remember_class", lambda key, cls: calls.append(key))
    load_tokenizer(str(copy))
    assert len(calls) == 1 and calls[0] is not None  # decided by AutoTokenizer, then remembered under its own key


@pytest.mark.parametrize("content", ["not json", "[1, 2]", json.dumps({"x": "os:system"})])
def test_a_broken_or_foreign_cache_file_is_ignored(content, tmp_path, cache_dir):
    folder = build_tiny_model("llama", tmp_path / "llama")
    key = tokenizer_module._folder_key(folder)
    cache_dir.mkdir(parents=True)
    foreign = content if "os:system" not in content else json.dumps({key: "os:system"})
    (cache_dir / "tokenizer_classes.json").write_text(foreign)
    assert tokenizer_module._remembered_class(key) is None
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.encode("Hello world") == AutoTokenizer.from_pretrained(folder).encode("Hello world")
    assert json.loads((cache_dir / "tokenizer_classes.json").read_text())[key].startswith("transformers.")


def test_an_unwritable_cache_folder_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KVBOX_CACHE_DIR", str(blocker / "cache"))  # under a file: mkdir fails
    folder = build_tiny_model("llama", tmp_path / "llama")
    assert load_tokenizer(str(folder)).encode("Hello") == load_tokenizer(str(folder)).encode("Hello")


def test_no_home_and_no_transformers_version_skip_the_cache(tmp_path, monkeypatch):
    """A container's user id without a passwd entry has no home; a transformers source tree has no version: the
    tokenizer loads through AutoTokenizer all the same."""
    import importlib.metadata
    from pathlib import Path

    folder = build_tiny_model("llama", tmp_path / "llama")
    for name in ("KVBOX_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert tokenizer_module._class_cache_file() is None
    assert load_tokenizer(str(folder)).encode("Hello") == AutoTokenizer.from_pretrained(folder).encode("Hello")
    monkeypatch.undo()
    monkeypatch.setenv("KVBOX_CACHE_DIR", str(tmp_path / "cache"))

    def no_version(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_version)
    assert tokenizer_module._folder_key(folder) is None
    assert load_tokenizer(str(folder)).encode("Hello") == AutoTokenizer.from_pretrained(folder).encode("Hello")
    assert not (tmp_path / "cache" / "tokenizer_classes.json").exists()
