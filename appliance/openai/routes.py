"""Every route of the OpenAI-compatible API, for `appliance.app.create_app`."""

from appliance.openai import lora, responses
from appliance.openai.chat import create_chat_completion
from appliance.openai.completions import create_completion
from appliance.openai.embeddings import create_embeddings
from appliance.openai.models import list_models, retrieve_model
from appliance.openai.score import create_score, rerank
from appliance.openai.tokenize import detokenize, tokenize

ROUTES = [list_models, retrieve_model, create_completion, create_chat_completion, tokenize, detokenize, *lora.ROUTES,
          create_embeddings, create_score, rerank, *responses.ROUTES]
