"""The FP8 KV cache through the engine (`kv_cache_dtype` fp8 / fp8_e4m3 / fp8_e5m2) against a fake-quantized
transformers reference of the same scheme: every key and value after RoPE rounded through fp8 as x / scale, read
back as q * scale, with the checkpoint's per-layer k_scale / v_scale.

It cannot match float token for token, so the rule is relative to the quantization's own effect (as in
tests/test_quantization_w8a8.py): along the reference's greedy path, the mean |logprob difference| between kvbox and
the fake-quantized reference must be at most TOLERANCE times the mean |logprob difference| between that reference
and the float model. A checkpoint whose KV scales are 25% off must fail the rule (a test shows it does).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bench.perplexity import prompt_token_logprobs
from engine import LLM
from engine.config import EngineConfigError
from tests.test_quantization import SHAPE

TOLERANCE = 0.1
PROMPT = [5, 17, 99, 3, 250, 31, 7, 402]
NEW_TOKENS = 24
FP8_TYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def fake_quant(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """The scheme, written here independently of kernels.reference: saturate x / scale, round to fp8, times scale."""
    top = FP8_MAX[dtype]
    return (x / scale).clamp(-top, top).to(dtype).float() * scale


def checkpoint_scales(num_layers: int) -> dict[str, torch.Tensor]:
    """Per-layer scales in the layout vLLM / llm-compressor write, as a calibration would give them: the tiny
    model's largest |K|, |V| (about 8) map to 448 or beyond."""
    scales = {}
    for i in range(num_layers):
        scales[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.02 * (i + 1))
        scales[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.015 * (i + 2))
    return scales


def with_scales(folder, out, factor: float = 1.0):
    """A copy of the checkpoint with its KV scales (times `factor`) beside the weights."""
    import shutil

    shutil.copytree(folder, out)
    tensors = load_file(out / "model.safetensors")
    num_layers = 1 + max(int(name.split(".")[2]) for name in tensors if name.startswith("model.layers."))
    tensors.update({k: v * factor for k, v in checkpoint_scales(num_layers).items()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def scaled_model(tmp_path_factory):
    from engine.tools.tiny_model import build_tiny_model
    base = tmp_path_factory.mktemp("kvfp8")
    return with_scales(build_tiny_model("llama", base / "float", **SHAPE), base / "scaled")


def reference(folder, dtype: torch.dtype | None, path: list[int] | None = None,
              scales: dict[str, torch.Tensor] | None = None) -> tuple[list[int], torch.Tensor]:
    """transformers in float32, K/V fake-quantized to `dtype` with `scales` (default: the checkpoint's; dtype None:
    float): `path` (default: its own greedy path from PROMPT) and the log-softmax at each of its positions."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    scales = scales or checkpoint_scales(model.config.num_hidden_layers)

    def attend(module, query, key, value, *args, **kwargs):
        if dtype is not None:
            prefix = f"model.layers.{module.layer_idx}.self_attn."
            key = fake_quant(key, dtype, float(scales[prefix + "k_scale"]))
            value = fake_quant(value, dtype, float(scales[prefix + "v_scale"]))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("fake_fp8_kv", attend)
    model.set_attn_implementation("fake_fp8_kv")
    with torch.inference_mode():
        if path is None:
            path = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, top_p=None,
                                  top_k=None, temperature=None)[0].tolist()
        return path, model(torch.tensor([path])).logits[0].log_softmax(-1)


def path_logprobs(logprobs: torch.Tensor, path: list[int]) -> torch.Tensor:
    """The logprob of each generated token of the path, from the position before it."""
    return logprobs[len(PROMPT) - 1:-1].gather(-1, torch.tensor(path[len(PROMPT):])[:, None])[:, 0]


def kvbox_path_logprobs(folder, kv_cache_dtype: str, path: list[int], **options) -> torch.Tensor:
    llm = LLM(str(folder), dtype="float32", kv_cache_dtype=kv_cache_dtype, max_model_len=64, num_kv_blocks=16,
              block_size=8, **options)
    return torch.tensor(prompt_token_logprobs(llm, [path])[0][len(PROMPT) - 1:])


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_kv_cache_within_the_rule(scaled_model, tmp_path, kv_cache_dtype):
    dtype = FP8_TYPES[kv_cache_dtype]
    path, fake = reference(scaled_model, dtype)
    _, float_logprobs = reference(scaled_model, None, path)
    fake_path = path_logprobs(fake, path)
    own_effect = float((fake_path - path_logprobs(float_logprobs, path)).abs().mean())
    assert own_effect > 1e-4  # the scheme changes something: the rule below is not vacuous

    got = kvbox_path_logprobs(scaled_model, kv_cache_dtype, path)
    assert float((got - fake_path).abs().mean()) <= TOLERANCE * own_effect

    # The same rule catches KV scales 25% off.
    off = with_scales(scaled_model, tmp_path / "off", 1.25)
    wrong = kvbox_path_logprobs(off, kv_cache_dtype, path)
    assert float((wrong - fake_path).abs().mean()) > TOLERANCE * own_effect


def test_checkpoint_scales_reach_the_attention_layers(scaled_model):
    llm = LLM(str(scaled_model), dtype="float32", kv_cache_dtype="fp8", max_model_len=64, num_kv_blocks=4)
    layers = llm.core.runner.model.attention_layers()
    assert [a.k_scale for a in layers] == pytest.approx([0.02 * (i + 1) for i in range(len(layers))])
    assert [a.v_scale for a in layers] == pytest.approx([0.015 * (i + 2) for i in range(len(layers))])
    assert layers[0].kv_cache.dtype == torch.float8_e4m3fn


def test_auto_keeps_the_model_dtype_and_outputs(tiny_model):
    """kv_cache_dtype auto is the float cache of before: the scales are ignored, prompt logprobs unchanged."""
    path = PROMPT * 2
    llm = LLM(tiny_model(), dtype="float32", max_model_len=64, num_kv_blocks=8)
    assert llm.core.runner.model.attention_layers()[0].kv_cache.dtype == torch.float32
    explicit = LLM(tiny_model(), dtype="float32", kv_cache_dtype="auto", max_model_len=64, num_kv_blocks=8)
    assert prompt_token_logprobs(llm, [path]) == prompt_token_logprobs(explicit, [path])


@pytest.mark.parametrize("model_dtype", ["bfloat16", "float16"])
def test_fp8_cache_holds_twice_the_blocks_in_the_same_memory(tiny_model, model_dtype):
    budget = 3 << 20
    blocks = {kv: LLM(tiny_model(), dtype=model_dtype, kv_cache_dtype=kv, kv_cache_memory_bytes=budget)
              .core.kv_manager.pool.num_blocks for kv in ("auto", "fp8", "fp8_e5m2")}
    assert blocks["fp8"] == blocks["fp8_e5m2"] == 2 * blocks["auto"] > 0


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(EngineConfigError, match=r"kv_cache_dtype: expected one of auto, fp8, fp8_e4m3, fp8_e5m2, "
                                                r"got 'int8'"):
        LLM("unused", kv_cache_dtype="int8")


def test_e4m3_is_refused_on_a_gpu_older_than_ada(monkeypatch):
    from engine.kv_dtype import check_kv_cache_dtype, kv_cache_torch_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    cuda = torch.device("cuda")
    for name in ("fp8", "fp8_e4m3"):
        with pytest.raises(EngineConfigError) as error:
            check_kv_cache_dtype(name, cuda, "triton")
        assert str(error.value) == (f"kv_cache_dtype: {name!r} (e4m3) needs CUDA compute capability 8.9 or newer "
                                    "(Ada, Hopper) in the Triton kernels; NVIDIA A100 has 8.0: use fp8_e5m2 or auto "
                                    "(YAML: kv_cache.dtype)")
    for name, device, backend in (("fp8_e5m2", cuda, "triton"), ("auto", cuda, "triton"),
                                  ("fp8", cuda, "torch"), ("fp8", torch.device("cpu"), "torch")):
        check_kv_cache_dtype(name, device, backend)
    assert kv_cache_torch_dtype("fp8_e5m2", torch.bfloat16) == torch.float8_e5m2
    assert kv_cache_torch_dtype("fp8_e4m3", torch.bfloat16) == torch.float8_e4m3fn
    assert kv_cache_torch_dtype("auto", torch.bfloat16) == torch.bfloat16


class _LoadingStarted(Exception):
    pass


@pytest.mark.parametrize("kv_cache_dtype, capability, refused", [
    ("fp8", (8, 0), True), ("fp8_e4m3", (8, 6), True), ("fp8_e5m2", (8, 0), False), ("fp8", (9, 0), False)])
def test_e4m3_is_refused_before_any_weight_is_loaded(tiny_model, monkeypatch, kv_cache_dtype, capability, refused):
    """The engine on a CUDA device (its queries patched: this runs on the CPU) refuses e4m3 below 8.9 before the
    weight loader runs; where the cache type runs, the loader is what comes next (stopped there)."""
    from engine import kernels, runner

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GPU")
    # The runner sets the process' kernel backend (Triton, on CUDA); the tests after this one run on the CPU's.
    monkeypatch.setattr(kernels._active, "name", kernels._active.name)
    monkeypatch.setattr(kernels._active, "ops", kernels._active.ops)
    loads = []

    def load_model(*args, **kwargs):
        loads.append(args[1])
        raise _LoadingStarted

    monkeypatch.setattr(runner, "load_model", load_model)
    with pytest.raises(EngineConfigError if refused else _LoadingStarted) as error:
        LLM(tiny_model(), device="cuda", dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, max_model_len=64)
    if refused:
        assert str(error.value) == (f"kv_cache_dtype: {kv_cache_dtype!r} (e4m3) needs CUDA compute capability 8.9 or "
                                    f"newer (Ada, Hopper) in the Triton kernels; NVIDIA GPU has {capability[0]}."
                                    f"{capability[1]}: use fp8_e5m2 or auto (YAML: kv_cache.dtype)")
    assert loads == ([] if refused else [tiny_model()])


def test_yaml_key_maps_to_the_engine_option():
    from tests.test_config import error, model, parse

    spec = parse(model("kv_cache: {dtype: fp8_e5m2}")).models[0]
    assert spec.to_engine_config(spec.source).kv_cache_dtype == "fp8_e5m2"
    assert parse(model()).models[0].kv_cache.dtype == "auto"
    assert error(model("kv_cache: {dtype: int8}")) == \
        "config.yaml: models[0].kv_cache.dtype: expected one of auto, fp8, fp8_e4m3, fp8_e5m2, got 'int8'"


def test_served_with_an_fp8_cache_and_shown_on_the_dashboard(tiny_model):
    from tests.helpers_server import ADMIN_KEY, model_config, run_inprocess, server_config

    config = server_config([model_config("m", tiny_model(), kv_cache={"num_blocks": 64, "dtype": "fp8"})])
    with run_inprocess(config) as server:
        completion = server.client().completions.create(model="m", prompt="hello there", max_tokens=4, temperature=0)
        assert completion.choices[0].finish_reason in ("stop", "length")
        with server.http(ADMIN_KEY) as http:
            [m] = http.get("/admin/stats").json()["models"]
    assert m["kv_cache_dtype"] == "fp8"
