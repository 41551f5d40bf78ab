"""The OpenAI-compatible API (plus vLLM's /tokenize and /detokenize)."""

from appliance.openai.chat import create_chat_completion
from appliance.openai.completions import create_completion
from appliance.openai.models import list_models, retrieve_model
from appliance.openai.tokenize import detokenize, tokenize

ROUTES = [list_models, retrieve_model, create_completion, create_chat_completion, tokenize, detokenize]
