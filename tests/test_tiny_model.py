"""Tiny checkpoints must load in transformers, look like the family they claim, and be reproducible."""

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.tools.tiny_model import FAMILIES, build_tiny_model, main

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2  # 1234567, $19.99\n\n",
    "café naïve Grüße 日本語 🙂 ❤️ 👍🏽",
    "  leading spaces, DON'T split 'em\ttabs\r\n",
)
# Longer than the 16-token sliding windows, so windowed attention matters.
PROMPT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman "
    "who told stories about café au lait, 日本語 and 🙂 to anyone who would listen."
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each family built once and loaded once: family -> (folder, model, tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in FAMILIES:
        path = build_tiny_model(family, root / family)
        out[family] = (path, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    return out


def _files(path):
    return {name: (path / name).read_bytes() for name in FILES}


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_and_special_tokens(built, family):
    path, model, tok = built[family]
    assert all((path / name).is_file() for name in FILES)
    assert len(tok) == model.config.vocab_size == 512
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|im_end|>", "<|pad|>")}
    assert model.config.bos_token_id == ids["<|begin_of_text|>"] == tok.bos_token_id
    assert model.config.eos_token_id == ids["<|end_of_text|>"] == tok.eos_token_id
    assert model.config.pad_token_id == ids["<|pad|>"] == tok.pad_token_id
    assert model.generation_config.eos_token_id == [ids["<|end_of_text|>"], ids["<|im_end|>"]]
    assert json.loads((path / "special_tokens_map.json").read_text())["eos_token"] == "<|end_of_text|>"
    assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_and_matches_raw_tokenizer_json(built, family):
    path, _, tok = built[family]
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text).ids  # our loader reads tokenizer.json directly
        assert tok.decode(ids) == text
    # Multi-byte characters must span several tokens to exercise incremental detokenization.
    assert len(tok("日")["input_ids"]) > 1
    assert tok("<|im_start|>user<|im_end|>")["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_is_chatml(built, family):
    tok = built[family][2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False).endswith("Hi<|im_end|>\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_gives_decisive_finite_logits(built, family):
    _, model, tok = built[family]
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 32
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert logits.shape == (ids.shape[1], 512)
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_not_default_initialized(built, family):
    # Unit norms or zero biases would hide bugs in how an engine applies them.
    for name, param in built[family][1].named_parameters():
        assert param.std() > 0.05, name


def test_family_specific_config(built):
    cfg = {family: built[family][1].config for family in FAMILIES}
    for family in FAMILIES:
        c = cfg[family]
        assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 4, 2, 16)
        assert c.max_position_embeddings == 512
        assert c.tie_word_embeddings == (family in ("qwen3", "gemma2"))

    assert cfg["llama"].rope_parameters["rope_type"] == "default"
    rope = cfg["llama3"].rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == (8.0, 1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 64
    # All three llama3 bands occur: kept, smoothed, and divided by the factor.
    inv_freq = built["llama3"][1].model.rotary_emb.inv_freq
    plain = 500000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    ratio = plain / inv_freq
    assert torch.isclose(ratio[0], torch.tensor(1.0))
    assert torch.isclose(ratio[-1], torch.tensor(8.0))
    assert ((ratio > 1.01) & (ratio < 7.99)).any()

    assert cfg["mistral"].sliding_window == 16
    assert cfg["qwen2"].sliding_window is None
    assert built["qwen2"][1].model.layers[0].self_attn.q_proj.bias is not None
    assert built["qwen3"][1].model.layers[0].self_attn.q_norm.weight.shape == (16,)

    g = cfg["gemma2"]
    assert (g.sliding_window, g.attn_logit_softcapping, g.final_logit_softcapping) == (16, 50.0, 30.0)
    assert (g.query_pre_attn_scalar, g.hidden_activation) == (16, "gelu_pytorch_tanh")
    assert g.layer_types == ["sliding_attention", "full_attention"] * 2


def test_same_seed_is_byte_identical_and_seed_changes_weights(tmp_path):
    a = _files(build_tiny_model("qwen3", tmp_path / "a", seed=7))
    b = _files(build_tiny_model("qwen3", tmp_path / "b", seed=7))
    c = _files(build_tiny_model("qwen3", tmp_path / "c", seed=8))
    assert a == b
    assert a["tokenizer.json"] == c["tokenizer.json"]
    assert a["model.safetensors"] != c["model.safetensors"]


def test_tokenizer_identical_across_processes(tmp_path, built):
    # The BPE trainer hashes internally; a fresh interpreter gets fresh hash seeds.
    code = "import sys; from engine.tools.tiny_model import build_tiny_model; build_tiny_model('llama', sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub")], check=True, capture_output=True)
    assert _files(tmp_path / "sub") == _files(built["llama"][0])


def test_config_overrides(tmp_path):
    path = build_tiny_model("llama", tmp_path, num_hidden_layers=3, max_position_embeddings=128)
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["max_position_embeddings"]) == (3, 128)
    assert json.loads((path / "tokenizer_config.json").read_text())["model_max_length"] == 128


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model("gpt2", tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli(tmp_path, capsys):
    assert main(["mistral", str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    expected = build_tiny_model("mistral", tmp_path / "api", seed=3)
    assert _files(tmp_path / "cli") == _files(expected)
