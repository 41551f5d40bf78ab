"""Speculative decoding: drafts proposed on the scheduler's side (`drafter.py`, `ngram.py`), verified by the runner
in one forward (`verify.py`), with rejection sampling in `engine.sampler.rejection_sample`."""
