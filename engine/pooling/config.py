"""Which pooling an embed or score engine applies, resolved once at start-up into a `PoolerInfo`.

The operator's options win; else the checkpoint's sentence-transformers files (`modules.json` naming a Pooling
module whose `config.json` picks the mode, and a Normalize module); else the family's convention: decoders pool the
last token, encoders the CLS token, both normalized. A cross-encoder (task score) reads the CLS token through its
classifier head. sentence-transformers modules kvbox does not run (Dense layers, max pooling) are refused rather
than silently skipped, since the embeddings would differ from the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.config import EngineConfig
from engine.contract import PoolerInfo
from engine.models.config import ModelConfig
from engine.models.registry import is_encoder

_ST_PREFIX = "sentence_transformers.models."
_ST_RUN = {"Transformer", "Pooling", "Normalize"}
# 1_Pooling/config.json's mode flags -> our pooling type.
_ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last"}


def resolve_pooler(config: EngineConfig, model_config: ModelConfig) -> PoolerInfo | None:
    """None for a generating engine."""
    if config.task == "generate":
        return None
    folder = Path(config.model)
    if config.task == "score":
        if model_config.num_labels != 1:
            raise ValueError(f"task score needs a cross-encoder with one label; {model_config.architecture} has "
                             f"{model_config.num_labels}")
        return PoolerInfo("score", "cls", False, 1)
    st_type, st_normalize = _sentence_transformers_pooling(folder) if folder.is_dir() else (None, None)
    default_type = "cls" if is_encoder(model_config.architecture) else "last"
    pooling_type = config.pooling_type or st_type or default_type
    normalize = next(v for v in (config.pooling_normalize, st_normalize, True) if v is not None)
    dims = config.matryoshka_dimensions or _config_matryoshka(folder)
    if dims is not None and max(dims) > model_config.hidden_size:
        raise ValueError(f"matryoshka_dimensions {list(dims)} exceed the model's hidden size "
                         f"{model_config.hidden_size}")
    return PoolerInfo("embed", pooling_type, normalize, model_config.hidden_size,
                      sorted(dims) if dims is not None else None)


def max_seq_length(model: str) -> int | None:
    """sentence-transformers' own length limit (sentence_bert_config.json), which its results assume."""
    path = Path(model) / "sentence_bert_config.json"
    return json.loads(path.read_text()).get("max_seq_length") if path.is_file() else None


def _sentence_transformers_pooling(folder: Path) -> tuple[str | None, bool | None]:
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None, None
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].removeprefix(_ST_PREFIX) for m in modules]
    if unsupported := [k for k in kinds if k not in _ST_RUN]:
        raise ValueError(f"{modules_file} lists sentence-transformers modules kvbox does not run: "
                         f"{', '.join(unsupported)}")
    pooling_type = None
    for module in modules:
        if module["type"].endswith("Pooling"):
            pooling_type = _pooling_mode(json.loads((folder / module["path"] / "config.json").read_text()))
    return pooling_type, "Normalize" in kinds


def _pooling_mode(pooling: dict) -> str:
    modes = [key for key, value in pooling.items() if key.startswith("pooling_mode_") and value]
    if len(modes) != 1 or modes[0] not in _ST_MODES:
        raise ValueError(f"unsupported sentence-transformers pooling {modes}; kvbox pools by "
                         + ", ".join(_ST_MODES))
    return _ST_MODES[modes[0]]


def _config_matryoshka(folder: Path) -> tuple[int, ...] | None:
    path = folder / "config.json"
    dims = json.loads(path.read_text()).get("matryoshka_dimensions") if path.is_file() else None
    return tuple(dims) if dims else None
