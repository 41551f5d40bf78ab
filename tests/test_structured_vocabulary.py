"""The engine's vocabulary index for grammars (`engine.structured_output.vocabulary`): a process that has not
imported transformers (a served engine) gets it from a child process, equal to the one built in-process; a failed
load names the tokenizer and the child's error; an engine's grammars compile against it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.structured_output import vocabulary


def _vocab_size(folder: str) -> int:
    return json.loads((Path(folder) / "config.json").read_text())["vocab_size"]


def hide_transformers(monkeypatch) -> list:
    """Hides transformers from the check (not from the import system: nothing after this imports it again) and
    returns the list of the vocabulary children started from here on."""
    started = []
    run = subprocess.run

    def counting_run(args, **kwargs):
        if vocabulary.__name__ in args:
            started.append(args)
        return run(args, **kwargs)

    monkeypatch.delitem(sys.modules, "transformers")
    monkeypatch.setattr(subprocess, "run", counting_run)
    return started


def test_the_childs_index_equals_the_in_process_one(tiny_model, monkeypatch):
    folder = tiny_model("llama")
    size = _vocab_size(folder)
    here = vocabulary._build(folder, size, [2])
    child_runs = hide_transformers(monkeypatch)
    there = vocabulary.tokenizer_info(folder, size, [2])
    assert len(child_runs) == 1
    assert there.decoded_vocab == here.decoded_vocab and len(here.decoded_vocab) == size
    assert (there.vocab_type, there.add_prefix_space, there.stop_token_ids, there.special_token_ids) == \
        (here.vocab_type, here.add_prefix_space, here.stop_token_ids, here.special_token_ids)


def test_a_failed_load_names_the_tokenizer_and_the_reason(tmp_path, monkeypatch):
    child_runs = hide_transformers(monkeypatch)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=rf"loading the tokenizer '{tmp_path}' for structured outputs failed: \S"):
        vocabulary.tokenizer_info(str(tmp_path), 100, [0])
    assert len(child_runs) == 1


def test_an_engine_without_transformers_compiles_grammars_from_the_childs_index(tiny_model):
    """A fresh interpreter, as the supervisor starts an engine process: transformers is not imported when the
    engine is built, the index comes from a child, and a grammar compiles and constrains a matcher."""
    script = f"""
import sys
from engine.core import EngineCore
from engine.config import EngineConfig
from engine.structured_output import vocabulary
from engine.structured_output.params import StructuredOutputsParams
children = []
run = vocabulary.subprocess.run
def counting_run(args, **kwargs):
    if vocabulary.__name__ in args:
        children.append(args)
    return run(args, **kwargs)
vocabulary.subprocess.run = counting_run
core = EngineCore(EngineConfig(model={tiny_model("llama")!r}, device="cpu", dtype="float32", num_kv_blocks=64))
assert "transformers" not in sys.modules
assert core.structured.wait_loaded(120)
grammar = core.structured.backend.compile(StructuredOutputsParams(choice=["yes", "no"])).result()
print(len(children), type(grammar).__name__)
"""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "CompiledGrammar"]


def test_a_tokenizer_that_fails_to_load_fails_structured_requests_not_the_engine(tiny_model, tmp_path):
    """The engine's grammar tokenizer does not load (here: a folder without one): a structured request ends in an
    error (the API's 500), the engine goes on, and a plain request after it is answered."""
    from engine.core import EngineCore
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams
    from engine.structured_output.params import StructuredOutputsParams

    (tmp_path / "config.json").write_text("{}")
    core = EngineCore(EngineConfig(model=tiny_model("llama"), tokenizer=str(tmp_path), device="cpu",
                                   dtype="float32", num_kv_blocks=64))
    core.structured.wait_loaded(120)
    core.add_request("structured", [1, 2, 3], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"])))
    core.add_request("plain", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    finished = {}
    for _ in range(50):
        for output in core.step():
            if output.finished:
                finished[output.request_id] = output
        if not core.has_unfinished_requests():
            break
    assert finished["structured"].finish_reason == "error"
    assert finished["plain"].finish_reason == "length" and len(finished["plain"].new_token_ids) > 0


def test_what_the_tokenizer_prints_in_the_child_does_not_reach_the_index(tiny_model):
    """The child hands its index over on stdout; a library printing while the tokenizer loads goes to stderr."""
    import xgrammar as xgr

    folder = tiny_model("llama")
    script = f"""
import runpy, sys
import engine.tokenizer
load = engine.tokenizer.load_tokenizer
engine.tokenizer.load_tokenizer = lambda path: print("a library's chatter") or load(path)
sys.argv = ["vocabulary", {folder!r}, "{_vocab_size(folder)}", "[2]"]
runpy.run_module("engine.structured_output.vocabulary", run_name="__main__")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "a library's chatter" in done.stderr
    there = xgr.TokenizerInfo.deserialize_json(done.stdout)
    assert there.decoded_vocab == vocabulary._build(folder, _vocab_size(folder), [2]).decoded_vocab
