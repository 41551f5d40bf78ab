"""Structured outputs (JSON schema, regex, choice, EBNF grammar) with xgrammar.

`params.StructuredOutputsParams` is the request's plain-data part (it travels inside `SamplingParams`); `grammar`
turns it into an xgrammar grammar (syntax checks, compilation, shared with the API's up-front check); `backend`
compiles grammars off the step loop and caches them by key; `manager` is the scheduler's side: one matcher per
request, advanced with each accepted token, and the step's packed token bitmask. Importing this package loads
neither torch nor xgrammar.
"""
