"""Tiny, randomly initialized encoder checkpoints (BERT, RoBERTa, their cross-encoders) for tests and demos.

The companion of `tiny_model.py` for the encoder families: a WordPiece tokenizer trained offline on the same
embedded corpus (with BERT's or RoBERTa's special tokens and pair template), a small transformers config, random
deterministic weights and, when asked, the sentence-transformers files (`modules.json`, `1_Pooling/config.json`)
that declare an embedder's pooling.
"""

from __future__ import annotations

import json
import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoModel, AutoModelForSequenceClassification, BertConfig, PreTrainedTokenizerFast,
                          RobertaConfig, XLMRobertaConfig)

ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta", "bert-cross", "roberta-cross")
_VOCAB_SIZE = 400
_SPECIALS = {  # family base -> (pad, unk, cls, sep, mask)
    "bert": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "roberta": ("<pad>", "<unk>", "<s>", "</s>", "<mask>"),
}
_ST_MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken"}


def _train_tokenizer(base: str, corpus: str) -> PreTrainedTokenizerFast:
    pad, unk, cls, sep, mask = _SPECIALS[base]
    tokenizer = Tokenizer(models.WordPiece(unk_token=unk))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    # The specials come first, as in real vocabularies (pad 0 for BERT, 1 for RoBERTa, as their configs expect).
    specials = [pad, unk, cls, sep, mask] if base == "bert" else [cls, pad, sep, unk, mask]
    trainer = trainers.WordPieceTrainer(vocab_size=_VOCAB_SIZE, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    ids = {t: tokenizer.token_to_id(t) for t in (cls, sep)}
    if base == "bert":
        single, pair = f"{cls} $A:0 {sep}:0", f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1"
    else:
        single, pair = f"{cls} $A:0 {sep}:0", f"{cls}:0 $A:0 {sep}:0 {sep}:0 $B:0 {sep}:0"
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
    names = ["input_ids", "token_type_ids", "attention_mask"] if base == "bert" else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, unk_token=unk, cls_token=cls,
                                   sep_token=sep, mask_token=mask, model_input_names=names)


def _config(family: str, tokenizer: PreTrainedTokenizerFast, overrides: dict):
    base = family.removesuffix("-cross")
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family.endswith("-cross"):
        common["num_labels"] = 1
    if base == "bert":
        return BertConfig(**{**common, "type_vocab_size": 2, **overrides})
    cls = RobertaConfig if base == "roberta" else XLMRobertaConfig
    # RoBERTa positions start at pad_token_id + 1, so the table has that many more rows.
    return cls(**{**common, "type_vocab_size": 1, "max_position_embeddings": 130,
                  "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id, **overrides})


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
        if "LayerNorm.weight" in name:
            param.copy_(1.0 + 0.1 * noise)
        elif name.endswith(".bias"):
            param.copy_(0.1 * noise)
        else:
            param.copy_(0.2 * noise)


def build_tiny_encoder(family: str, out: pathlib.Path, corpus: str, *, seed: int = 0,
                       pooling: str | None = None, normalize: bool = True, **config_overrides) -> pathlib.Path:
    """`pooling` (mean, cls, last) writes the sentence-transformers files that declare it (and Normalize)."""
    tokenizer = _train_tokenizer(family.removesuffix("-cross").replace("xlm-", ""), corpus)
    config = _config(family, tokenizer, config_overrides)
    auto = AutoModelForSequenceClassification if family.endswith("-cross") else AutoModel
    model = auto.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model.save_pretrained(out)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(out)
    if pooling is not None:
        _write_sentence_transformers(out, pooling, normalize, config.hidden_size)
    return out


def _write_sentence_transformers(out: pathlib.Path, pooling: str, normalize: bool, width: int) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    modes = {mode: key == pooling for key, mode in _ST_MODES.items()}
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": width, **modes}))
