"""The OpenAI-compatible API (plus vLLM's /tokenize and /detokenize, and LoRA adapters at run time); `routes`
lists its handlers."""
