"""Quantized linears: the scheme a model runs (`spec.py`, torch-free so that `kvbox check-config` can read it), the
linear method of each format (one file each: `unquantized.py`, `gptq.py`, `awq.py`, `compressed_tensors.py`,
`w8a8.py`, sharing `wna16.py`; AutoRound checkpoints run on GPTQ's and AWQ's; `gguf.py` for GGUF blocks kept
packed), the method chosen for a scheme (`methods.py`) and the one in effect while a model
is built (`context.py`). Nothing here is imported by this package itself, so importing `spec` stays light.
"""
