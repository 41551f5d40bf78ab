"""Tensor-parallel engines: the process group every rank joins (`parallel_state`), the worker process that runs one
rank (`worker`) and the engine side that drives them (`tp_runner`)."""
