"""8-bit weights with quantized activations (FP8 and INT8 W8A8: fp8 checkpoints, compressed-tensors float- and
int-quantized, online `quantization: fp8 | int8`) against a fake-quantized transformers model of the same scheme.
Asymmetric int8 activations (a zero point per token or a static one) are fake-quantized by compressed-tensors' own
`calculate_qparams` / `fake_quantize`, the library llm-compressor quantizes with.

They cannot match float token for token, so the rule is relative to the quantization's own effect: along the
reference's greedy path, the mean |logprob difference| between kvbox and the fake-quantized reference must be at most
TOLERANCE times the mean |logprob difference| between that reference and the float model. A checkpoint whose weight
scales are 25% off must fail the rule (a test shows it does).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.quantization.calibration import calibration_windows
from engine.quantization.spec import QuantizationConfigError, parse_quantization
from engine.tools import quantized_checkpoints as qc
from tests.test_quantization import SHAPE, prefill_logits

CPU = torch.device("cpu")
TOLERANCE = 0.1
INPUT_SCALE = 4.0 / 448  # a static fp8 activation scale: the tiny model's normed activations stay within about 4
TOKENS = torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from engine.tools.tiny_model import build_tiny_model
    return build_tiny_model("llama", tmp_path_factory.mktemp("float"), **SHAPE)


def fake_quant(x: torch.Tensor, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    """The activation quantization of the scheme, written here independently of kernels.reference."""
    top = 448.0 if dtype == torch.float8_e4m3fn else 127.0
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top if scale is None else torch.tensor(scale)
    q = (x / s).clamp(-top, top)
    return (q.to(dtype).float() if dtype == torch.float8_e4m3fn else q.round()) * s


def ct_asym_args(static: bool):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(num_bits=8, type="int", symmetric=False, dynamic=not static,
                            strategy="tensor" if static else "token")


def fake_quant_asym(x: torch.Tensor, scale: float | None, zero_point: int | None) -> torch.Tensor:
    """Asymmetric int8 activations as compressed-tensors quantizes them: per token, or the static pair."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    args = ct_asym_args(static=scale is not None)
    if scale is None:
        s, z = calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)
    else:
        s, z = torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int8)
    return fake_quantize(x, s, z, args)


def ct_scheme(kind: str, strategy: str, static: bool, symmetric_inputs: bool = True):
    """compressed-tensors' FP8 / INT8 W8A8 scheme for every Linear."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    inputs = (QuantizationArgs(num_bits=8, type=kind, symmetric=True, dynamic=not static,
                               strategy="tensor" if static else "token") if symmetric_inputs else ct_asym_args(static))
    return QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy=strategy),
        input_activations=inputs)


def ct_config(kind: str, strategy: str, static: bool, symmetric_inputs: bool = True) -> dict:
    """compressed-tensors' own serialization of an FP8 / INT8 W8A8 scheme (as llm-compressor saves it)."""
    from compressed_tensors.quantization import QuantizationConfig
    scheme = ct_scheme(kind, strategy, static, symmetric_inputs)
    fmt = "float-quantized" if kind == "float" else "int-quantized"
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                                ignore=["lm_head"])
    return {"version": "0.0", "quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {},
            **json.loads(config.model_dump_json(exclude=["quant_method"]))}


def int8_writer(static: bool = False, symmetric_inputs: bool = True, static_asym: tuple[float, int] | None = None):
    """A layer writer whose tensors are what compressed-tensors' int-quantized compressor saves: its own per-channel
    qparams (bfloat16 scales), the weight quantized by it, zero points dropped where the scheme is symmetric; a
    static asymmetric input keeps its `input_scale` [1] and int8 `input_zero_point` [1]."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams
    scheme = ct_scheme("int", "channel", static, symmetric_inputs)

    def write(w: torch.Tensor):
        scale, zero_point = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), scheme.weights)
        state = {"weight": w, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero_point}
        if static_asym is not None:
            state["input_scale"] = torch.tensor([static_asym[0]], dtype=torch.bfloat16)
            state["input_zero_point"] = torch.tensor([static_asym[1]], dtype=torch.int8)
        tensors = IntQuantizationCompressor.compress(state, scheme)
        assert "weight_zero_point" not in tensors and ("input_zero_point" in tensors) == (static_asym is not None)
        return tensors, tensors["weight"].float() * tensors["weight_scale"].float()
    return write


ASYM_STATIC = (float(torch.tensor(8.0 / 255).bfloat16()), -3)  # inputs within about [-3.9, 4.1]: a zero point off 0

# name -> (quantization_config, layer writer, activation dtype or "asym", static input scale (asym: scale, zero point))
CHECKPOINTS = {
    "fp8-tensor-dynamic": (qc.fp8_config(False), lambda w: qc.fp8_tensors(w, False, None), torch.float8_e4m3fn, None),
    "fp8-tensor-static": (qc.fp8_config(True), lambda w: qc.fp8_tensors(w, False, INPUT_SCALE), torch.float8_e4m3fn,
                          INPUT_SCALE),
    "ct-fp8-channel-dynamic": (ct_config("float", "channel", False), lambda w: qc.fp8_tensors(w, True, None),
                               torch.float8_e4m3fn, None),
    "ct-int8-channel-dynamic": (ct_config("int", "channel", False), int8_writer(), torch.int8, None),
    "ct-int8-channel-dynamic-asym": (ct_config("int", "channel", False, symmetric_inputs=False),
                                     int8_writer(symmetric_inputs=False), "asym", None),
    "ct-int8-channel-static-asym": (ct_config("int", "channel", True, symmetric_inputs=False),
                                    int8_writer(True, False, ASYM_STATIC), "asym", ASYM_STATIC),
}


def fake_input(x: torch.Tensor, dtype, input_scale) -> torch.Tensor:
    if dtype == "asym":
        return fake_quant_asym(x, *(input_scale or (None, None)))
    return fake_quant(x, dtype, input_scale)


def reference_logits(folder, weights: dict[str, torch.Tensor] | None, dtype, input_scale,
                     kept: tuple[str, ...] = ()) -> torch.Tensor:
    """transformers in float32 with each decoder linear's weight replaced and its input fake-quantized, but those
    named in `kept`."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if name.split(".")[-1] in qc.LINEARS and name not in kept:
            if weights is not None:
                module.weight.data = weights[name + ".weight"]
            if dtype is not None:
                module.register_forward_pre_hook(lambda _, args: (fake_input(args[0], dtype, input_scale),))
    with torch.inference_mode():
        return model(torch.tensor([TOKENS])).logits[0]


def rule_ratio(got: torch.Tensor, fake: torch.Tensor, float_logits: torch.Tensor) -> float:
    """kvbox's distance from the fake-quantized reference over the quantization's own effect, on the greedy path."""
    path = fake.argmax(-1, keepdim=True)
    def logprobs(logits):
        return logits.log_softmax(-1).gather(-1, path)
    own_effect = (logprobs(fake) - logprobs(float_logits)).abs().mean()
    return float((logprobs(got) - logprobs(fake)).abs().mean() / own_effect)


@pytest.fixture(scope="module")
def float_logits(float_model):
    return reference_logits(float_model, None, None, None)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
@torch.inference_mode()
def test_w8a8_checkpoint_within_the_rule(float_model, float_logits, tmp_path, name):
    config_dict, writer, dtype, input_scale = CHECKPOINTS[name]
    dequantized = qc.write_quantized(float_model, tmp_path / "q", config_dict, writer)
    config = ModelConfig.from_pretrained(tmp_path / "q", dtype="float32")
    model = load_model(config, tmp_path / "q", CPU)
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == (torch.int8 if dtype == "asym" else dtype)
    assert (down.azp_adj is not None) == (dtype == "asym")
    got = prefill_logits(model, config, TOKENS)
    fake = reference_logits(float_model, dequantized, dtype, input_scale)
    assert rule_ratio(got, fake, float_logits) <= TOLERANCE

    # The same rule catches weight scales 25% off.
    qc.write_quantized(float_model, tmp_path / "off", config_dict,
                       lambda w: ({k: v * 1.25 if k == "weight_scale" else v for k, v in writer(w)[0].items()}, None))
    wrong = prefill_logits(load_model(config, tmp_path / "off", CPU), config, TOKENS)
    assert rule_ratio(wrong, fake, float_logits) > TOLERANCE


@pytest.mark.parametrize("method, dtype, inputs", [("fp8", torch.float8_e4m3fn, torch.float8_e4m3fn),
                                                   ("int8", torch.int8, "asym")])
@torch.inference_mode()
def test_online_quantization_within_the_rule(float_model, float_logits, method, dtype, inputs):
    config = ModelConfig.from_pretrained(float_model, dtype="float32")
    model = load_model(config, float_model, CPU, quantization=method)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == dtype and qkv.weight_scale.shape == (qkv.output_size,)
    # The last layer's down projection stays float, input and weight (spec.last_down_proj); the one before is 8-bit.
    last = f"model.layers.{config.num_layers - 1}.mlp.down_proj"
    assert model.get_submodule(last).weight.dtype == torch.float32
    assert model.get_submodule(f"model.layers.{config.num_layers - 2}.mlp.down_proj").weight.dtype == dtype
    assert last in model.quant_scheme.describe()
    # The reference quantizes each weight row symmetrically to the type's range, as vLLM's per-channel schemes do.
    weights = {}
    for name, module in AutoModelForCausalLM.from_pretrained(float_model, dtype=torch.float32).named_modules():
        if name.split(".")[-1] in qc.LINEARS:
            weights[name + ".weight"] = fake_quant(module.weight.data, dtype, None)
    fake = reference_logits(float_model, weights, inputs, None, kept=(last,))
    assert rule_ratio(prefill_logits(model, config, TOKENS), fake, float_logits) <= TOLERANCE
    if inputs == "asym":  # the same rule tells asymmetric activations from the symmetric ones kvbox ran before
        symmetric = reference_logits(float_model, weights, dtype, None, kept=(last,))
        assert rule_ratio(symmetric, fake, float_logits) > TOLERANCE


def calibration_kept(folder, fraction: float) -> dict[str, torch.Tensor]:
    """Each transformers decoder linear's input channels with the largest |x| over the built-in calibration text
    (the engine's windows of it, one transformers forward each), `fraction` of them, sorted."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    amax, hooks = {}, []
    for name, module in model.named_modules():
        if name.split(".")[-1] in qc.LINEARS:
            def record(_, args, name=name):
                seen = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
                amax[name] = torch.maximum(amax[name], seen) if name in amax else seen
            hooks.append(module.register_forward_pre_hook(record))
    with torch.inference_mode():
        for window in calibration_windows(str(folder), model.config.max_position_embeddings):
            model(torch.tensor([window]))
    return {name: a.topk(max(1, round(fraction * a.numel()))).indices.sort().values for name, a in amax.items()}


def outlier_reference_logits(folder, dtype, inputs, kept: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers in float32, each decoder linear y = fake(x) @ fake(W without the kept columns)^T + x[:, kept] @
    W[:, kept]^T: LLM.int8()'s decomposition, the kept columns out of the weight's per-row scales."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if name in kept:
            weight, index = module.weight.data.clone(), kept[name]
            quantized = fake_quant(weight.index_fill(1, index, 0.0), dtype, None)

            def forward(x, quantized=quantized, index=index, kept_weight=weight[:, index]):
                return fake_input(x, inputs, None) @ quantized.T + x[..., index] @ kept_weight.T
            module.forward = forward
    with torch.inference_mode():
        return model(torch.tensor([TOKENS])).logits[0]


@pytest.mark.parametrize("method, dtype, inputs", [("fp8", torch.float8_e4m3fn, torch.float8_e4m3fn),
                                                   ("int8", torch.int8, "asym")])
@torch.inference_mode()
def test_online_outlier_channels_stay_in_float_within_the_rule(float_model, float_logits, method, dtype, inputs):
    fraction = 0.05  # of the tiny model's 128 (256 at down) inputs: 6 (13)
    config = ModelConfig.from_pretrained(float_model, dtype="float32")
    model = load_model(config, float_model, CPU, quantization=method, outlier_fraction=fraction)
    kept = calibration_kept(float_model, fraction)
    kept.pop(f"model.layers.{config.num_layers - 1}.mlp.down_proj")  # float whole (spec.last_down_proj)
    layer = model.model.layers[0]
    for engine_linear, names in ((layer.self_attn.qkv_proj, ["q_proj", "k_proj", "v_proj"]),
                                 (layer.self_attn.o_proj, ["o_proj"]), (layer.mlp.down_proj, ["down_proj"])):
        for name in names:  # q/k/v share their input, so their calibration picks the same channels
            part = next(key for key in kept if key.startswith("model.layers.0.") and key.endswith(name))
            assert engine_linear.outlier_index.tolist() == kept[part].tolist()
        index = engine_linear.outlier_index
        assert (engine_linear.weight[:, index].float() == 0).all()
        assert engine_linear.quant_method.input_quant_dtype(engine_linear) is None  # the float input must reach it
    fake = outlier_reference_logits(float_model, dtype, inputs, kept)
    assert rule_ratio(prefill_logits(model, config, TOKENS), fake, float_logits) <= TOLERANCE
    # The plain scheme is another computation: the rule tells them apart.
    plain = load_model(config, float_model, CPU, quantization=method, outlier_fraction=None)
    assert plain.model.layers[0].mlp.down_proj.outlier_weight is None
    assert rule_ratio(prefill_logits(plain, config, TOKENS), fake, float_logits) > TOLERANCE


def test_outlier_fraction_without_online_quantization_warns_that_it_is_unapplied(float_model, caplog):
    """A float model served as it is keeps no channels in float (nothing is 8-bit): the loader says so."""
    config = ModelConfig.from_pretrained(float_model, dtype="float32")
    with caplog.at_level("WARNING", logger="engine.models.loader"):
        model = load_model(config, float_model, CPU, outlier_fraction=0.05)
    assert not any(hasattr(module, "outlier_index") for module in model.modules())
    assert "outlier_fraction 0.05 is not applied" in caplog.text


def test_dummy_weights_keep_as_many_channels_spread_evenly(float_model):
    config = ModelConfig.from_pretrained(float_model, dtype="float32")
    model = load_model(config, float_model, CPU, load_format="dummy", quantization="fp8", outlier_fraction=0.01)
    down = model.model.layers[0].mlp.down_proj  # 256 inputs: 1% is 3 of them
    assert down.outlier_index.tolist() == [0, 127, 255] and down.outlier_weight.shape == (down.output_size, 3)


@pytest.mark.parametrize("outlier_fraction", [None, 0.01])
def test_online_fp8_serves_through_the_engine(float_model, outlier_fraction):
    llm = LLM(str(float_model), dtype="float32", quantization="fp8", num_kv_blocks=32,
              outlier_fraction=outlier_fraction)
    qkv = llm.core.runner.model.model.layers[0].self_attn.qkv_proj
    # None (the default) keeps none; 1% of 128 inputs keeps one, at least one
    assert (qkv.outlier_weight is None) if outlier_fraction is None else qkv.outlier_index.numel() == 1
    [output] = llm.generate([[5, 17, 99, 3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                            use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4


def test_fp8_activations_are_refused_on_a_gpu_older_than_ada(monkeypatch):
    from engine.models import loader

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    scheme = parse_quantization(None, "fp8")
    with pytest.raises(QuantizationConfigError, match=r"quantization = 'fp8': FP8 W8A8 needs compute capability "
                       r"8.9 or newer .*A100 has 8.0 \(model m\)"):
        loader.check_device_runs(scheme, torch.device("cuda"), "m")
    loader.check_device_runs(parse_quantization(None, "int8"), torch.device("cuda"), "m")  # int8 runs anywhere
    loader.check_device_runs(scheme, torch.device("cpu"), "m")  # emulated on the CPU


def test_asymmetric_activations_are_int8_only_and_static_pairs_merge_to_cover_every_part():
    from engine.quantization.w8a8 import _merge_asymmetric

    config = ct_config("float", "channel", False)
    config["config_groups"]["group_0"]["input_activations"]["symmetric"] = False
    with pytest.raises(QuantizationConfigError) as error:
        parse_quantization(config, None)
    assert error.value.key == "quantization_config.config_groups.group_0.input_activations.symmetric"
    assert parse_quantization(None, "fp8").input_symmetric and not parse_quantization(None, "int8").input_symmetric
    assert parse_quantization(None, "int8").describe().endswith("dynamic asymmetric per-token activations")
    # q, k and v's static pairs -> one pair for the merged qkv_proj whose range holds each part's range (within the
    # half step the zero point's rounding moves it).
    scales, zero_points = torch.tensor([0.02, 0.05, 0.01]), torch.tensor([-10.0, 30.0, 0.0])
    scale, zero_point = _merge_asymmetric(scales, zero_points)
    low, high = scale * (-128 - zero_point), scale * (127 - zero_point)
    assert float(low) <= float((scales * (-128 - zero_points)).min()) + float(scale) / 2
    assert float(high) >= float((scales * (127 - zero_points)).max()) - float(scale) / 2
    single = _merge_asymmetric(scales[:1], zero_points[:1])  # one part: its own pair
    assert abs(float(single[0]) - 0.02) < 1e-8 and int(single[1]) == -10


def test_online_quantization_of_an_encoder_keeps_no_linear_in_float(tmp_path):
    """The last down projection stays float in generation models only (measured there): an embedding model's every
    linear is 8-bit, and its scheme names nothing float."""
    from engine.tools.tiny_encoder import build_tiny_encoder

    folder = build_tiny_encoder("bert", tmp_path / "bert", "the quick brown fox jumps over the lazy dog " * 40)
    config = ModelConfig.from_pretrained(folder, dtype="float32")
    model = load_model(config, folder, CPU, task="embed", quantization="int8")
    downs = [module for name, module in model.named_modules() if name.endswith("down_proj")]
    assert downs and all(module.weight.dtype == torch.int8 for module in downs)
    assert "float" not in model.quant_scheme.describe()


def test_online_quantization_keeps_the_last_down_projection_float_in_the_last_pipeline_stage_only(tmp_path):
    from engine.distributed.pipeline import PipelineStage
    from engine.tools.tiny_model import build_tiny_model

    folder = build_tiny_model("llama", tmp_path / "m", num_hidden_layers=4)
    config = ModelConfig.from_pretrained(folder, dtype="float32")
    dtypes = {}
    for stage in (PipelineStage(range(0, 2), 0, 2), PipelineStage(range(2, 4), 1, 2)):
        model = load_model(config, folder, CPU, quantization="fp8", stage=stage)
        dtypes.update({name: module.weight.dtype for name, module in model.named_modules()
                       if name.endswith("mlp.down_proj")})
    assert dtypes == {f"model.layers.{layer}.mlp.down_proj": torch.float8_e4m3fn for layer in range(3)} | {
        "model.layers.3.mlp.down_proj": torch.float32}
