"""What a model's quantization is, read from its checkpoint's `quantization_config` and the user's `quantization`
option, checked, and reduced to one `QuantScheme`; torch-free, so that `kvbox check-config` can show and check it.

Each released tool writes its own keys (GPTQ: auto-gptq / gptqmodel; AWQ: AutoAWQ; compressed-tensors: llm-compressor;
fp8: vLLM / FP8 checkpoints; auto-round: Intel AutoRound, in GPTQ's or AWQ's layout; gguf: kvbox's GGUF reader);
everything outside what kvbox runs is refused here with the key and its value, so a model never loads
half-understood. Which linear method runs a scheme is `engine.quantization.methods`' job.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ONLINE_METHODS = ("fp8", "int8")  # the user's `quantization` option: quantize a float checkpoint at load
CHECKPOINT_METHODS = ("gptq", "awq", "compressed-tensors", "fp8", "auto-round", "gguf")
# vLLM's names for a checkpoint method run by a particular kernel; kvbox picks its kernel itself.
METHOD_ALIASES = {"gptq_marlin": "gptq", "awq_marlin": "awq"}
GROUP_SIZES = (-1, 32, 64, 128)  # -1: one group over the whole input dimension
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16")  # a GGUF file's tensors that load as float
_IGNORABLE = ("lm_head",)  # kvbox never quantizes the LM head, so a checkpoint may say so


def last_down_proj(num_layers: int) -> str:
    """The one linear of a generation model that online quantization (fp8, int8) leaves in the model's dtype: the last
    decoder layer's down projection, whose output reaches the final norm and the LM head with no later layer to
    dilute its error (embedding and scoring models quantize every linear: on all-MiniLM-L6-v2 no one linear in float
    took more than 11% off fp8's embedding error, `bench/encoder_quant.py --per-linear`). On SmolLM2-135M its 8-bit
    weights alone gave 16% of the KL divergence from float that all 210 linears' 8-bit weights gave, seven times a
    typical layer's whole; in float it took online fp8's perplexity over float from +2.39% to +1.65% on GPL-3, +3.64%
    to +1.89% on Apache-2.0 and +2.62% to +1.53% on four other licences (int8: +0.59% to +0.55%, +2.32% to +2.02%,
    +1.41% to +1.26%; bench/RESULTS.md, twenty-sixth session). llama.cpp's quantization mixes give late layers'
    ffn_down more bits too."""
    return f"model.layers.{num_layers - 1}.mlp.down_proj"


class QuantizationConfigError(ValueError):
    """A quantization setting kvbox cannot run; `key` names it (`quantization_config.bits`, `quantization`)."""

    def __init__(self, key: str, value: Any, problem: str):
        super().__init__(f"{key} = {value!r}: {problem}")
        self.key, self.value, self.problem = key, value, problem


@dataclass(frozen=True)
class QuantScheme:
    """How every decoder linear of the model stores and runs its weight.

    `layout` picks the linear method: gptq | awq | pack (compressed-tensors pack-quantized) | fp8 | int8.
    `activations` is None for weight-only schemes (and block-scaled FP8, which kvbox runs weight-only), "token" for
    dynamic per-token scales, "tensor" for a static per-tensor `input_scale` from the checkpoint; `input_symmetric`
    False: int8 activations with a zero point (per token, or the checkpoint's static `input_zero_point`).
    `weight_strategy` is channel | tensor | group | block (`block_size`: [rows, columns], the last block of either
    cut short where the block does not divide the linear).
    """

    method: str  # what the user sees: gptq, awq, compressed-tensors, fp8, int8
    layout: str
    bits: int
    group_size: int = -1
    symmetric: bool = True
    act_order: bool = False
    weight_strategy: str = "group"
    block_size: tuple[int, int] | None = None
    activations: str | None = None
    input_symmetric: bool = True
    online: bool = False
    gguf_types: tuple[tuple[str, int], ...] = ()  # gguf: the block types the file holds and their tensor counts
    # Where quantization_config keeps the weights' keys (bits, group_size): compressed-tensors nests them.
    weights_at: str = field(default="", compare=False)
    # Decoder linears kept in float (a checkpoint's ignore list; online quantization's `last_down_proj`): HF module
    # names, or "re:" + a pattern that re.match-es them (compressed-tensors' syntax).
    unquantized: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for check-config and the dashboard: "gptq 4-bit, group 128, act-order"."""
        if self.layout == "gguf":
            return f"gguf {' + '.join(f'{qtype} x {count}' for qtype, count in self.gguf_types)} tensors, weight-only"
        parts = [f"{self.method}{' (online)' if self.online else ''} {self.bits}-bit"]
        if self.weight_strategy == "group":
            parts.append("per-channel" if self.group_size == -1 else f"group {self.group_size}")
        elif self.weight_strategy == "block":
            parts.append(f"block {self.block_size[0]}x{self.block_size[1]}")
        else:
            parts.append(f"per-{self.weight_strategy}")
        if not self.symmetric:
            parts.append("zero points")
        if self.act_order:
            parts.append("act-order")
        asym = "" if self.input_symmetric else "asymmetric "
        # Block-scaled weights name no activations even where the checkpoint quantizes them (_block_size).
        parts.append("activations unquantized" if self.weight_strategy == "block" else
                     {None: "weight-only", "token": f"dynamic {asym}per-token activations",
                      "tensor": f"static {asym}activation scale"}[self.activations])
        if self.unquantized:  # an ignore list may name every layer's module
            more = len(self.unquantized) - 3
            parts.append(f"float: {' '.join(self.unquantized[:3])}{f' and {more} more' if more > 0 else ''}")
        return ", ".join(parts)

    def keeps_float(self, hf_name: str) -> bool:
        """Whether decoder linear `hf_name` (model.layers.0.mlp.down_proj) stays unquantized."""
        return any(re.match(entry[3:], hf_name) if entry.startswith("re:") else entry == hf_name
                   for entry in self.unquantized)


def parse_quantization(checkpoint: dict[str, Any] | None, requested: str | None,
                       num_layers: int | None = None) -> QuantScheme | None:
    """The scheme in effect: the checkpoint's, or `requested` (fp8 / int8) applied to a float checkpoint, which keeps
    `last_down_proj(num_layers)` in float where a generation model's layer count is given. As in vLLM, `requested`
    may also name the checkpoint's own method (gptq, awq, compressed-tensors...), which must then be the one its
    config.json declares."""
    if requested in (None, "none"):
        return _parse_checkpoint(checkpoint) if checkpoint else None
    method = METHOD_ALIASES.get(requested, requested)
    if method not in ONLINE_METHODS + CHECKPOINT_METHODS:
        raise QuantizationConfigError("quantization", requested, f"expected one of none, {', '.join(ONLINE_METHODS)} "
                                      "(quantize a float checkpoint at load) or the checkpoint's own method: "
                                      f"{', '.join(CHECKPOINT_METHODS + tuple(METHOD_ALIASES))}")
    scheme = _parse_checkpoint(checkpoint) if checkpoint else None
    if scheme is None and method in ONLINE_METHODS:
        # int8 with a zero point per token: half the perplexity cost of symmetric (bench/RESULTS.md)
        return QuantScheme(method, method, 8, weight_strategy="channel", activations="token",
                           input_symmetric=method != "int8", online=True,
                           unquantized=(last_down_proj(num_layers),) if num_layers else ())
    if scheme is None:
        raise QuantizationConfigError("quantization", requested, f"{requested} is a checkpoint's own method, but "
                                      "this checkpoint is not quantized (its config.json has no quantization_config); "
                                      "fp8 or int8 quantize a float checkpoint at load")
    if scheme.method == method or (method in ONLINE_METHODS and scheme.layout == method):
        return scheme  # an fp8 checkpoint asked to run as fp8 is just that
    if method in ONLINE_METHODS:
        raise QuantizationConfigError("quantization", requested, f"{requested} quantizes a float checkpoint, but this "
                                      f"one is already quantized ({scheme.describe()}); leave quantization unset to "
                                      "run it as it is")
    raise QuantizationConfigError("quantization", requested, f"the checkpoint's quantization_config.quant_method is "
                                  f"{checkpoint.get('quant_method')!r}, not {method} ({scheme.describe()}); leave "
                                  f"quantization unset or set it to {scheme.method}")


# Each merged decoder linear's checkpoint modules, under model.layers.N.
_LINEAR_PARTS = {"qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "o_proj": ("self_attn.o_proj",), "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                 "down_proj": ("mlp.down_proj",)}


def check_linear_shapes(scheme: QuantScheme | None, num_layers: int, hidden_size: int, intermediate_size: int,
                        q_size: int, kv_size: int) -> None:
    """Every quantized decoder linear (qkv, o, gate/up, down: [inputs, outputs of each part]) splits into the
    scheme's groups, packed words and merged parts' blocks; else the checkpoint's key that does not fit is named,
    before anything is allocated. A linear the checkpoint leaves in float in every layer has no groups to split."""
    if scheme is None or (scheme.layout in ("gguf", "fp8", "int8") and scheme.block_size is None):
        return
    linears = {"qkv_proj": (hidden_size, (q_size, kv_size, kv_size)), "o_proj": (q_size, (hidden_size,)),
               "gate_up_proj": (hidden_size, (intermediate_size,)), "down_proj": (intermediate_size, (hidden_size,))}
    at = f"quantization_config.{scheme.weights_at}"
    for name, (inputs, outputs) in linears.items():
        if scheme.unquantized and all(scheme.keeps_float(f"model.layers.{layer}.{part}")
                                      for layer in range(num_layers) for part in _LINEAR_PARTS[name]):
            continue
        shape = f"{name}'s {inputs} inputs and {', '.join(map(str, outputs))} outputs"
        if scheme.block_size is not None:
            # Each checkpoint tensor's last block may be cut short, but a merged linear's part must then end it:
            # the next part's scales begin a block of their own. vLLM asks the same (bar the last part).
            if len(_LINEAR_PARTS[name]) > 1 and any(size % scheme.block_size[0] for size in outputs):
                raise QuantizationConfigError(f"{at}{'block_structure' if scheme.weights_at else 'weight_block_size'}",
                                              list(scheme.block_size), f"the blocks do not divide {shape}, which "
                                              "kvbox merges into one linear")
            continue
        if scheme.group_size != -1 and inputs % scheme.group_size:
            raise QuantizationConfigError(f"{at}group_size", scheme.group_size, f"the groups do not divide {shape}")
        pack = 32 // scheme.bits
        # GPTQ packs its zero points, AWQ its weights, along the outputs too; pack-quantized its zero points.
        out_pack = pack if scheme.layout in ("gptq", "awq") or not scheme.symmetric else 1
        if inputs % pack or any(size % out_pack for size in outputs):
            raise QuantizationConfigError(f"{at}{'num_' if scheme.weights_at else ''}bits", scheme.bits,
                                          f"{pack} values a 32-bit word do not divide {shape}")


def _parse_checkpoint(config: dict[str, Any]) -> QuantScheme | None:
    method = config.get("quant_method")
    parsers = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed_tensors, "fp8": _fp8,
               "auto-round": _auto_round, "intel/auto-round": _auto_round, "gguf": _gguf}
    if method not in parsers:
        raise QuantizationConfigError("quantization_config.quant_method", method,
                                      f"kvbox runs {', '.join(CHECKPOINT_METHODS)}")
    return parsers[method](config)


def _key(config: dict[str, Any], key: str, allowed: tuple, default: Any = None, prefix: str = "") -> Any:
    value = config.get(key, default)
    if value not in allowed:
        raise QuantizationConfigError(f"quantization_config.{prefix}{key}", value,
                                      f"kvbox supports {', '.join(map(repr, allowed))}")
    return value


def _gptq(config: dict[str, Any]) -> QuantScheme:
    # gptq_v2 (gptqmodel's internal format) stores zero points without the minus one; only the classic one is read.
    _key(config, "checkpoint_format", ("gptq",), "gptq")
    # gptqmodel's keys: int8 / int16 words pack another layout; a quantized lm_head has tensors kvbox has no place for.
    _key(config, "pack_dtype", ("int32",), "int32")
    _key(config, "lm_head", (False,), False)
    # gptqmodel's per-module rules, re.match-ed against module names: "-:pattern" leaves them in float; any other
    # rule overrides bits or groups, which would need a second scheme.
    dynamic = config.get("dynamic") or {}
    overrides = [rule for rule in dynamic if not rule.startswith("-:")]
    if overrides:
        raise QuantizationConfigError("quantization_config.dynamic", overrides,
                                      "per-module GPTQ overrides are not supported (only -: rules, modules in float)")
    return QuantScheme("gptq", "gptq", _key(config, "bits", (4, 8)), _key(config, "group_size", GROUP_SIZES),
                       symmetric=_key(config, "sym", (True, False), True),
                       act_order=_key(config, "desc_act", (True, False), False),
                       unquantized=tuple(f"re:{rule[2:]}" for rule in dynamic) + _gptq_unlisted(config))


def _gptq_unlisted(config: dict[str, Any]) -> tuple[str, ...]:
    """transformers' and gptqmodel's modules_in_block_to_quantize: the decoder block's linears that were quantized
    (self_attn.q_proj ...), in lists by quantization step; as vLLM, a linear is in when an entry is part of its name.
    The unquantized entry that keeps the others float; none when every linear kvbox builds is in."""
    value = config.get("modules_in_block_to_quantize") or []
    listed = [name for item in value for name in (item if isinstance(item, list) else [item])] \
        if isinstance(value, list) else [None]
    if not all(isinstance(name, str) for name in listed):
        raise QuantizationConfigError("quantization_config.modules_in_block_to_quantize", value,
                                      "expected a list of module names, or of lists of them")
    if not listed or all(any(name in part for name in listed) for parts in _LINEAR_PARTS.values() for part in parts):
        return ()
    return (f"re:(?!.*(?:{'|'.join(map(re.escape, listed))}))",)


def _awq(config: dict[str, Any]) -> QuantScheme:
    version = str(config.get("version", "gemm")).lower()
    _key({"version": version}, "version", ("gemm",))
    _key(config, "zero_point", (True,), True)
    # AutoAWQ (and vLLM) skip every module whose name contains an entry.
    unquantized = tuple(f"re:.*{re.escape(entry)}" for entry in _ignored(config.get("modules_to_not_convert")))
    # AutoAWQ's own quant_config.json names them w_bit and q_group_size (vLLM reads either name).
    bits = "w_bit" if "w_bit" in config and "bits" not in config else "bits"
    group = "q_group_size" if "q_group_size" in config and "group_size" not in config else "group_size"
    return QuantScheme("awq", "awq", _key(config, bits, (4,)), _key(config, group, GROUP_SIZES[1:]),
                       symmetric=False, unquantized=unquantized)


# AutoRound's packing formats (the part after "auto_round:") -> the layout it writes: auto-gptq's (zero points
# stored minus one, as GPTQ's checkpoint_format gptq) or AutoAWQ's GEMM one.
_AUTO_ROUND_LAYOUTS = {"auto_gptq": "gptq", "gptq": "gptq", "auto_awq": "awq", "awq": "awq"}


def _auto_round(config: dict[str, Any]) -> QuantScheme:
    """Intel AutoRound: `packing_format` (before 0.5: `quant_method: intel/auto-round` and the format under
    `backend`, such as auto_round:gptq:exllamav2), weight-only integers with its own bits / group_size / sym."""
    key = "packing_format" if "packing_format" in config else "backend"
    packing = config.get(key, "auto_round:auto_gptq")
    parts = str(packing).split(":")
    layout = _AUTO_ROUND_LAYOUTS.get(parts[1]) if len(parts) > 1 and parts[0] == "auto_round" else None
    if layout is None:
        raise QuantizationConfigError(f"quantization_config.{key}", packing, "kvbox runs AutoRound's "
                                      "auto_round:auto_gptq and auto_round:auto_awq packing formats")
    _key(config, "data_type", ("int",), "int")
    if config.get("act_bits", 16) < 16:
        raise QuantizationConfigError("quantization_config.act_bits", config["act_bits"],
                                      "kvbox runs AutoRound's weight-only schemes (act_bits 16)")
    # Per-layer overrides: 16 bits (a layer left in float) runs; other settings would need a second scheme.
    extra = config.get("extra_config") or {}
    others = [name for name in _ignored(extra) if extra[name].get("bits", 16) < 16]
    if others:
        raise QuantizationConfigError("quantization_config.extra_config", others,
                                      "kvbox runs one scheme for every quantized linear; layers may only stay float")
    bits = _key(config, "bits", (4, 8) if layout == "gptq" else (4,))
    group_size = _key(config, "group_size", GROUP_SIZES if layout == "gptq" else GROUP_SIZES[1:])
    symmetric = _key(config, "sym", (True, False), True) and layout == "gptq"  # AWQ's layout always has zero points
    return QuantScheme("auto-round", layout, bits, group_size, symmetric=symmetric, unquantized=_ignored(extra))


def gguf_quantization_config(tensor_types: Iterable[str]) -> dict[str, Any] | None:
    """A GGUF file's quantization_config from its tensors' type names (its header alone, so that check-config reads
    no weights): `quant_method: gguf` and each block type's tensor count, most first; None when all are float."""
    counts = Counter(qtype for qtype in tensor_types if qtype not in GGUF_FLOAT_TYPES)
    return {"quant_method": "gguf", "types": dict(counts.most_common())} if counts else None


def _gguf(config: dict[str, Any]) -> QuantScheme:
    """Written by `gguf_quantization_config`; each tensor says its own type, so the scheme only names them."""
    return QuantScheme("gguf", "gguf", 0, weight_strategy="block", gguf_types=tuple(config.get("types", {}).items()))


def _fp8(config: dict[str, Any]) -> QuantScheme:
    _key(config, "fmt", ("e4m3",), "e4m3")  # e5m2 bytes read as e4m3 would be other numbers
    activations = {"dynamic": "token", "static": "tensor"}[_key(config, "activation_scheme", ("dynamic", "static"))]
    # vLLM's ignored_layers names modules exactly; transformers' FineGrainedFP8 (Qwen's, DeepSeek's FP8 releases)
    # writes modules_to_not_convert, whose entries name a module, a parent of it or its last parts.
    unquantized = _ignored(config.get("ignored_layers")) + tuple(
        rf"re:(?:.*\.)?{re.escape(entry)}(?:\..*)?$" for entry in _ignored(config.get("modules_to_not_convert")))
    if config.get("weight_block_size") is None:
        return QuantScheme("fp8", "fp8", 8, weight_strategy="tensor", activations=activations,
                           unquantized=unquantized)
    block = _block_size(config, "weight_block_size", "")
    if activations == "tensor":  # as vLLM: block-scaled checkpoints are calibrated for dynamic activations only
        raise QuantizationConfigError("quantization_config.activation_scheme", "static", "block-scaled weights "
                                      "(weight_block_size) run with dynamic activations only")
    return QuantScheme("fp8", "fp8", 8, weight_strategy="block", block_size=block, unquantized=unquantized)


def _block_size(config: dict[str, Any], key: str, prefix: str) -> tuple[int, int]:
    """Block-scaled FP8 weights' [rows, columns]. kvbox runs them weight-only on every device, the checkpoint's
    dynamic activation quantization (per token, or FP8_BLOCK's per group of 128 columns) left out: each call
    dequantizes the weight and the GEMM runs in the model dtype, as no FP8 tensor-core GEMM here takes block scales."""
    block = config.get(key)
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise QuantizationConfigError(f"quantization_config.{prefix}{key}", block, "expected [rows, columns]")
    return block[0], block[1]


def _ignored(names: Any) -> tuple[str, ...]:
    """A checkpoint's modules left in float, but the LM head's: kvbox never quantizes that one."""
    return tuple(name for name in names or () if not any(part in name for part in _IGNORABLE))


_CT_FORMATS = {"pack-quantized": "pack", "int-quantized": "int8", "float-quantized": "fp8", "naive-quantized": "int8"}
_CT_STRATEGIES = {"pack": ("group", "channel"), "int8": ("tensor", "channel"), "fp8": ("tensor", "channel", "block")}


def _compressed_tensors(config: dict[str, Any]) -> QuantScheme | None:
    kv_cache = config.get("kv_cache_scheme")
    if kv_cache:  # its per-layer k_scale / v_scale load with the weights, for an fp8 kv_cache_dtype to use
        for key, allowed, default in (("type", ("float",), "int"), ("num_bits", (8,), 8),
                                      ("strategy", ("tensor", None), None), ("dynamic", (False,), False),
                                      ("symmetric", (True,), True)):  # compressed-tensors' defaults
            _key(kv_cache, key, allowed, default, prefix="kv_cache_scheme.")
    # llm-compressor writes both keys, empty (or a dense sparsity format) when the weights are only quantized.
    sparsity = config.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise QuantizationConfigError("quantization_config.sparsity_config.format", sparsity["format"],
                                      "kvbox runs dense weights only (no 2:4 or other sparse formats)")
    if config.get("transform_config"):
        raise QuantizationConfigError("quantization_config.transform_config", config["transform_config"],
                                      "kvbox does not apply compressed-tensors transforms (Hadamard or other "
                                      "rotations of the weights and activations)")
    groups = config.get("config_groups") or {}
    if kv_cache and not groups:  # llm-compressor's FP8 KV cache alone: the weights stay float
        return None
    name, group, targets = _ct_group(groups)
    at = f"config_groups.{name}."
    weights = group.get("weights") or {}
    if group.get("output_activations") is not None:
        raise QuantizationConfigError(f"quantization_config.{at}output_activations", group["output_activations"],
                                      "kvbox quantizes no linear's outputs")
    fmt_at, fmt = _ct_format(config, group, at)
    layout = _CT_FORMATS[_key({"format": fmt}, "format", tuple(_CT_FORMATS), prefix=fmt_at)]
    kind = "float" if layout == "fp8" else "int"
    _key(weights, "type", (kind,), prefix=at + "weights.")
    bits = _key(weights, "num_bits", (4, 8) if layout == "pack" else (8,), prefix=at + "weights.")
    strategy = _key(weights, "strategy", _CT_STRATEGIES[layout], prefix=at + "weights.")
    symmetric = _key(weights, "symmetric", (True,) if layout != "pack" else (True, False), True, at + "weights.")
    group_size = _key(weights, "group_size", GROUP_SIZES[1:], prefix=at + "weights.") if strategy == "group" else -1
    actorder = _key(weights, "actorder", (None, "group", "weight", "static", False), prefix=at + "weights.")
    activations, input_symmetric = _ct_activations(group.get("input_activations"), layout, at + "input_activations.",
                                                   block=strategy == "block")
    block = _block_size(weights, "block_structure", at + "weights.") if strategy == "block" else None
    return QuantScheme("compressed-tensors", layout, bits, group_size, symmetric=symmetric,
                       act_order=actorder == "group", weight_strategy="group" if layout == "pack" else strategy,
                       block_size=block, activations=activations, input_symmetric=input_symmetric,
                       weights_at=at + "weights.",
                       unquantized=_ignored(config.get("ignore")) + _ct_untargeted(targets, at))


def _ct_group(groups: dict[str, Any]) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """The one scheme kvbox runs: (the first group's name, its keys, every group's targets). llm-compressor writes
    one group per targets list, so groups with the same scheme are one."""
    if not groups:
        raise QuantizationConfigError("quantization_config.config_groups", groups, "no group: nothing is quantized")
    name = min(groups)
    scheme = {key: value for key, value in groups[name].items() if key != "targets"}
    others = [other for other, group in groups.items()
              if {key: value for key, value in group.items() if key != "targets"} != scheme]
    if others:
        raise QuantizationConfigError("quantization_config.config_groups", sorted(groups),
                                      f"kvbox runs one scheme for every linear, but {', '.join(sorted(others))} "
                                      f"differ from {name}")
    return name, groups[name], tuple(target for group in groups.values() for target in group.get("targets") or ())


def _ct_untargeted(targets: tuple[str, ...], at: str) -> tuple[str, ...]:
    """The unquantized entry that keeps float each linear no target names; none when one targets every Linear.
    compressed-tensors matches a target against the module's class name, or re.match-es a "re:" pattern against its
    name, else compares the whole name."""
    if any(target in ("Linear", "re:.*") for target in targets):
        return ()
    # A dotless name is a class (LlamaDecoderLayer) or the LM head, neither of which kvbox quantizes.
    others = [target for target in targets if not target.startswith("re:") and "." not in target]
    if others or not targets:
        raise QuantizationConfigError(f"quantization_config.{at}targets", list(targets), "kvbox quantizes decoder "
                                      "linears only: targets must be Linear, module names or re: patterns")
    patterns = (target[3:] if target.startswith("re:") else f"{re.escape(target)}$" for target in targets)
    return (f"re:(?!{'|'.join(f'(?:{pattern})' for pattern in patterns)})",)


def _ct_format(config: dict[str, Any], group: dict[str, Any], at: str) -> tuple[str, str]:
    """(where the format was read, the format). A group's own format wins over the top-level one, as in
    compressed-tensors; with neither (or mixed-precision, which defers to the groups'), it is inferred from the
    scheme as compressed-tensors' infer_module_format picks it."""
    if group.get("format"):
        return at, group["format"]
    if config.get("format") not in (None, "mixed-precision"):
        return "", config["format"]
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    if weights.get("type") == "float":
        return "", "float-quantized" if inputs is not None else "naive-quantized"
    return "", "int-quantized" if inputs is not None else "pack-quantized"


def _ct_activations(args: dict[str, Any] | None, layout: str, at: str, block: bool) -> tuple[str | None, bool]:
    """(activations, input_symmetric); int8 activations may carry zero points, fp8 ones may not. Block-scaled
    weights (FP8_BLOCK) take dynamic ones per token or per group of columns (which kvbox leaves unquantized)."""
    if args is None:
        if layout == "int8":
            raise QuantizationConfigError(f"quantization_config.{at[:-1]}", None,
                                          "int-quantized weights need int8 input activations (W8A8)")
        return None, True
    if layout == "pack":
        raise QuantizationConfigError(f"quantization_config.{at[:-1]}", args, "pack-quantized runs weight-only")
    _key(args, "type", ("float" if layout == "fp8" else "int",), prefix=at)
    _key(args, "num_bits", (8,), prefix=at)
    symmetric = _key(args, "symmetric", (True, False) if layout == "int8" else (True,), True, prefix=at)
    if args.get("dynamic", False):
        _key(args, "strategy", ("token", "group") if block else ("token",), prefix=at)
        return (None if block else "token"), symmetric  # block: see _block_size
    if block:  # as the fp8 method's weight_block_size
        raise QuantizationConfigError(f"quantization_config.{at}dynamic", False, "block-scaled weights run with "
                                      "dynamic activations only")
    _key(args, "strategy", ("tensor",), prefix=at)
    return "tensor", symmetric
