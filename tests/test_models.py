"""Our model implementations against Hugging Face's, plus config normalization and weight loading.

Each family runs as the engine runs it: one flat batch of several sequences through a hand-built paged KV cache
(shuffled block ids), then a second step with decodes and a prefill chunk on top of the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.kernels import cpu_native
from engine.models.attention import AttentionMetadata
from engine.models.config import ModelConfig
from engine.models.layers import MergedColumnParallelLinear, QKVParallelLinear, rope_inv_freq
from engine.models.loader import load_model
from engine.models.registry import SUPPORTED_ARCHITECTURES, get_model_class
from engine.tools.tiny_model import FAMILIES

CPU = torch.device("cpu")
ATOL = 1e-4
_OVERRIDES = {
    # Make Qwen2's second layer slide (layers at or above max_window_layers do), so the Qwen rule is exercised.
    "qwen2": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
    # A scalar unlike head_dim (as in Gemma 2 27B), so scaling by head_dim**-0.5 by mistake would show.
    "gemma2": dict(query_pre_attn_scalar=24),
}


@pytest.fixture
def tiny(tiny_model):
    """family -> Path of a tiny random HF checkpoint (built once per session by conftest's tiny_model)."""
    return lambda family: Path(tiny_model(family, **_OVERRIDES.get(family, {})))


class PagedCache:
    """A tiny stand-in for the runner: binds KV caches and turns (sequence, new tokens) chunks into one flat step."""

    def __init__(self, model, config: ModelConfig, block_size: int = 4, num_blocks: int = 64):
        for layer in model.attention_layers():
            layer.kv_cache = torch.zeros(2, num_blocks, block_size, config.num_kv_heads, config.head_size)
        # Shuffled so each sequence's blocks are scattered and interleaved with the others'.
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.block_size = block_size
        self.block_tables: dict[int, list[int]] = {}

    def step(self, chunks: list[tuple[int, list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """chunks: (sequence id, new token ids, num_computed_tokens before this step)."""
        input_ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
        for seq_id, tokens, num_computed in chunks:
            seq_len = num_computed + len(tokens)
            table = self.block_tables.setdefault(seq_id, [])
            while len(table) * self.block_size < seq_len:
                table.append(self.free_blocks.pop())
            for pos in range(num_computed, seq_len):
                positions.append(pos)
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            input_ids += tokens
            seq_lens.append(seq_len)
            starts.append(starts[-1] + len(tokens))
        max_blocks = max(len(self.block_tables[seq_id]) for seq_id, _, _ in chunks)
        block_tables = torch.tensor([self.block_tables[seq_id] + [0] * (max_blocks - len(self.block_tables[seq_id]))
                                     for seq_id, _, _ in chunks], dtype=torch.int32)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=block_tables,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            max_query_len=max(len(tokens) for _, tokens, _ in chunks),
            max_seq_len=max(seq_lens),
        )
        return torch.tensor(input_ids), torch.tensor(positions), metadata


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_matches_hf_prefill_decode_and_chunked_prefill(tiny, family):
    folder = tiny(family)
    config = ModelConfig.from_pretrained(folder)
    model = load_model(config, folder, CPU)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    gen = torch.Generator().manual_seed(1)
    # Three prompts (5, 23, 40 tokens) that each decode one token, and one 30-token prompt prefilled in two chunks.
    prompt_lens, total_lens = [5, 23, 40, 10], [6, 24, 41, 30]
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in total_lens]
    expected = [reference(torch.tensor([seq])).logits[0] for seq in seqs]  # [len, vocab] each

    cache = PagedCache(model, config)
    first = [(i, seq[:n], 0) for i, (seq, n) in enumerate(zip(seqs, prompt_lens))]
    second = [(i, seq[n:], n) for i, (seq, n) in enumerate(zip(seqs, prompt_lens))]
    for step in (first, second):
        logits = model.compute_logits(model(*cache.step(step)))  # [num_tokens, vocab]
        assert logits.dtype == torch.float32
        rows = logits.split([len(tokens) for _, tokens, _ in step])
        for (seq_id, tokens, num_computed), got in zip(step, rows):
            want = expected[seq_id][num_computed:num_computed + len(tokens)]
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"{family} sequence {seq_id}")


# A Llama 3.1-style config as transformers 4.x wrote it, and the same model as 5.x writes it.
_LLAMA_COMMON = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=128000,
    eos_token_id=128001, tie_word_embeddings=False,
)
_LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA_4X = {**_LLAMA_COMMON, "head_dim": None, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
             "rope_scaling": {**_LLAMA3_ROPE, "rope_type": "llama3"}}
_LLAMA_5X = {**_LLAMA_COMMON, "head_dim": 128, "dtype": "bfloat16",
             "rope_parameters": {**_LLAMA3_ROPE, "rope_type": "llama3", "rope_theta": 500000.0}}


def test_config_4x_and_5x_styles_normalize_to_the_same_config():
    generation = {"eos_token_id": [128001, 128008, 128009]}
    old = ModelConfig.from_dict(_LLAMA_4X, generation)
    new = ModelConfig.from_dict(_LLAMA_5X, generation)
    assert old == new
    assert (new.head_size, new.num_kv_heads, new.dtype) == (128, 8, torch.bfloat16)
    assert new.rope_theta == 500000.0
    assert new.rope_scaling == {"rope_type": "llama3", **_LLAMA3_ROPE}
    assert new.eos_token_ids == frozenset({128001, 128008, 128009})
    assert ModelConfig.from_dict(_LLAMA_5X).eos_token_ids == frozenset({128001})  # falls back to config.json
    assert new.max_model_len == 131072
    assert ModelConfig.from_dict(_LLAMA_5X, max_model_len=4096, dtype="float32").max_model_len == 4096
    assert ModelConfig.from_dict(_LLAMA_5X, dtype=torch.float16).dtype == torch.float16
    # The 4.x alias "type" for the rope type.
    linear = {**_LLAMA_COMMON, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_dict(linear).rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_position_embeddings 131072"):
        ModelConfig.from_dict(_LLAMA_5X, max_model_len=131073)
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'.*default, linear, llama3"):
        ModelConfig.from_dict({**_LLAMA_5X, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_config_layer_sliding_windows_follow_each_family():
    common = dict(_LLAMA_COMMON, num_hidden_layers=4, sliding_window=16)
    mistral = {**common, "model_type": "mistral"}
    assert ModelConfig.from_dict(mistral).layer_sliding_windows == (16, 16, 16, 16)
    assert ModelConfig.from_dict({**mistral, "sliding_window": None}).layer_sliding_windows == (0, 0, 0, 0)
    qwen2 = {**common, "model_type": "qwen2", "max_window_layers": 2}
    assert ModelConfig.from_dict({**qwen2, "use_sliding_window": True}).layer_sliding_windows == (0, 0, 16, 16)
    assert ModelConfig.from_dict(qwen2).layer_sliding_windows == (0, 0, 0, 0)
    # Gemma 2 from a 4.x config (no layer_types) must agree with transformers' own layer_types.
    gemma2 = {**common, "model_type": "gemma2"}
    hf_types = Gemma2Config(num_hidden_layers=4).layer_types
    assert ModelConfig.from_dict(gemma2).layer_sliding_windows == tuple(
        16 if kind == "sliding_attention" else 0 for kind in hf_types) == (16, 0, 16, 0)
    assert ModelConfig.from_dict({**gemma2, "layer_types": ["full_attention"] * 4}).layer_sliding_windows == (0,) * 4


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "llama3", "rope_theta": 500000.0, **_LLAMA3_ROPE},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
])
def test_rope_frequencies_match_transformers(rope_parameters):
    hf_config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                            rope_parameters=dict(rope_parameters))
    want, _ = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf_config, CPU)
    config = ModelConfig.from_dict({**_LLAMA_COMMON, "rope_parameters": rope_parameters})
    got = rope_inv_freq(config.rotary_dim, config.rope_theta, config.rope_scaling)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_merged_linears_load_each_ranks_shard(tp_size):
    """Only world size 1 runs today; this pins the shard layout the weight_loaders produce for larger ones."""
    gen = torch.Generator().manual_seed(0)
    hidden, head_size, num_heads, num_kv_heads = 16, 4, 8, 2
    q, k, v = (torch.randn(n * head_size, hidden, generator=gen) for n in (num_heads, num_kv_heads, num_kv_heads))
    gate, up = torch.randn(2, 24, hidden, generator=gen)
    kv_replicas = max(1, tp_size // num_kv_heads)  # with 4 ranks and 2 KV heads, ranks share a head in pairs
    kv_rows = head_size * max(1, num_kv_heads // tp_size)
    q_rows = head_size * num_heads // tp_size
    for rank in range(tp_size):
        qkv = QKVParallelLinear(hidden, head_size, num_heads, num_kv_heads, tp_rank=rank, tp_size=tp_size)
        for shard_id, weight in zip("qkv", (q, k, v)):
            qkv.weight.weight_loader(qkv.weight, weight, shard_id)
        kv_shard = rank // kv_replicas
        want = torch.cat([q[rank * q_rows:(rank + 1) * q_rows], k[kv_shard * kv_rows:(kv_shard + 1) * kv_rows],
                          v[kv_shard * kv_rows:(kv_shard + 1) * kv_rows]])
        torch.testing.assert_close(qkv.weight.data, want, rtol=0, atol=0)
        gate_up = MergedColumnParallelLinear(hidden, [24, 24], tp_rank=rank, tp_size=tp_size)
        for shard_id, weight in enumerate((gate, up)):
            gate_up.weight.weight_loader(gate_up.weight, weight, shard_id)
        rows = 24 // tp_size
        want = torch.cat([gate[rank * rows:(rank + 1) * rows], up[rank * rows:(rank + 1) * rows]])
        torch.testing.assert_close(gate_up.weight.data, want, rtol=0, atol=0)


def _state(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_sharded_safetensors_with_index_load(tiny, tmp_path):
    folder = tiny("llama")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, tmp_path / file)
    weight_map = {name: file for file, shard_names in shards.items() for name in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = ModelConfig.from_pretrained(tmp_path)
    sharded, single = _state(load_model(config, tmp_path, CPU)), _state(load_model(config, folder, CPU))
    assert sharded.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=0)


def test_pickled_bin_only_folder_is_refused(tiny, tmp_path):
    shutil.copy(tiny("llama") / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors only"):
        load_model(ModelConfig.from_pretrained(tmp_path), tmp_path, CPU)


@torch.inference_mode()
def test_dummy_weights_need_no_files(tiny, tmp_path):
    shutil.copy(tiny("gemma2") / "config.json", tmp_path / "config.json")
    config = ModelConfig.from_pretrained(tmp_path)
    model = load_model(config, tmp_path, CPU, load_format="dummy")
    assert not model.training
    torch.testing.assert_close(_state(model), _state(load_model(config, tmp_path, CPU, load_format="dummy")))
    logits = model.compute_logits(model(*PagedCache(model, config).step([(0, list(range(20)), 0)])))
    assert logits.shape == (20, config.vocab_size) and torch.isfinite(logits).all()


def test_load_weights_names_missing_and_unexpected_tensors(tiny, monkeypatch):
    folder = tiny("qwen2")
    config = ModelConfig.from_pretrained(folder)
    monkeypatch.setenv(cpu_native.ENV_VAR, "0")  # the weights keep the checkpoint's layout (not packed for the CPU)
    model = load_model(config, folder, CPU, load_format="dummy")
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    missing = "model.layers.1.self_attn.k_proj.bias"
    with pytest.raises(ValueError, match=f"missing 1 tensor.*{missing}"):
        model.load_weights((name, t) for name, t in tensors.items() if name != missing)
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        model.load_weights([*tensors.items(), ("model.layers.0.extra.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="cannot load 'model.norm.weight'.*shape"):
        model.load_weights({**tensors, "model.norm.weight": torch.zeros(3)}.items())


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="'GPT2LMHeadModel'") as error:
        get_model_class("GPT2LMHeadModel")
    assert all(name in str(error.value) for name in SUPPORTED_ARCHITECTURES)
    assert {"LlamaForCausalLM", "Gemma2ForCausalLM", "BertModel", "XLMRobertaForSequenceClassification"} <= set(
        SUPPORTED_ARCHITECTURES)
