"""Pooling models (task embed or score): which pooling applies (`config.py`), the runner's pooling of hidden states
(`pooler.py`) and the inputs a pooling request takes (`inputs.py`)."""
