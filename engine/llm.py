"""The offline API: `LLM(model=path, **engine options).generate(prompts, params)` and `.chat(messages)`.

Runs the engine core in this process, with no HTTP and no subprocess; the same core serves the appliance. With
`data_parallel_size=N`, N whole engines, one device each (`engine.data_parallel`).
With `enable_lora=True`, `add_lora(name, path)` loads a PEFT adapter and `lora_name` picks one per prompt.
With `task="embed"`, `embed(texts)` returns embeddings; with `task="score"` (a cross-encoder), `score(query,
documents)` returns one relevance score per document. `get_metrics()` reads the engine's counters (vLLM's names).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.data_parallel import DataParallelCores
from engine.contract import PoolingParams
from engine.metrics_reader import Metric, read_metrics
from engine.output_processor import OutputProcessor, RequestOutput
from engine.pooling.inputs import POOLING_SAMPLING, EmbeddingOutput, ScoreOutput, decode_vector, encode_pair
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer, render_chat
from engine.validation import validate_pooling_prompt, validate_prompt

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    def __init__(self, model: str, **engine_options):
        self.config = EngineConfig.from_kwargs(model, **engine_options)
        self.tokenizer = load_tokenizer(self.config.tokenizer or model)
        self.core = DataParallelCores(self.config) if self.config.data_parallel_size > 1 else EngineCore(self.config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stops the engine's worker processes (with tensor_parallel_size or pipeline_parallel_size > 1; they also
        end with this process)."""
        self.core.shutdown()

    def get_metrics(self) -> list[Metric]:
        """The engine's counters and gauges under vLLM's names (speculative decoding's among them, when on); with
        data_parallel_size > 1 each replica's, labelled `engine` by its index as vLLM labels them."""
        cores = self.core.replicas if isinstance(self.core, DataParallelCores) else [self.core]
        return [metric for index, core in enumerate(cores)
                for metric in read_metrics(core.stats(), self.config.model, self.config.block_size, engine=index)]

    def add_lora(self, name: str, path: str) -> None:
        """Loads the PEFT adapter folder at `path` under `name` (replacing one of that name)."""
        self.core.add_lora(name, path)

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priorities: Sequence[int] | None = None,
                 lora_name: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Generates for each prompt (text, or a list of token ids); returns outputs in prompt order. `lora_name`:
        one adapter for every prompt, or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = _broadcast(params or SamplingParams(), len(prompts))
        lora_names = _broadcast_lora_names(lora_name, len(prompts))
        texts = [prompt if isinstance(prompt, str) else None for prompt in prompts]
        token_ids = [self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt) for prompt in prompts]
        return self._run(self._add_all(texts, token_ids, params_list, priorities or [0] * len(prompts), lora_names),
                         use_tqdm)

    def beam_search(self, prompts: Prompt | dict | Sequence[Prompt | dict],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search (`engine.beam_search`) for each prompt (text, token ids, or a {"prompt": ...} dict); per
        prompt the `beam_width` best sequences, best first."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [p["prompt"] if isinstance(p, dict) else p for p in prompts]
        token_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for ids in token_ids:
            validate_prompt(ids, SamplingParams(), max_model_len=self.core.max_model_len,
                            vocab_size=self.core.vocab_size)
        search = BeamSearch(token_ids, params, self.core.eos_token_ids, self.core.max_model_len)
        kept: list[str] = []  # the last step's requests, whose K/V the next step forks from
        try:
            while pending := search.pending():
                step_ids = self._add_all([None] * len(pending), [ids for ids, _ in pending],
                                         [search.step_params] * len(pending), [0] * len(pending),
                                         [None] * len(pending), kv_parents=[parent for _, parent in pending])
                self.core.release_kv(kept)
                kept = step_ids
                outputs = self._run(step_ids, use_tqdm=False)
                search.update(step_ids, [output.outputs[0].logprobs[0] for output in outputs])
        finally:
            self.core.release_kv(kept)
        return search.results(lambda tokens: self.tokenizer.decode(tokens, skip_special_tokens=True))

    def chat(self, messages: list[Message] | Sequence[list[Message]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             lora_name: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template (sandboxed) and generates a reply."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [render_chat(self.tokenizer, c, chat_template, add_generation_prompt) for c in conversations]
        token_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        params_list = _broadcast(params or SamplingParams(), len(prompts))
        lora_names = _broadcast_lora_names(lora_name, len(prompts))
        return self._run(self._add_all(prompts, token_ids, params_list, [0] * len(prompts), lora_names), use_tqdm)

    def embed(self, inputs: Prompt | Sequence[Prompt], dimensions: int | None = None,
              use_tqdm: bool = True) -> list[EmbeddingOutput]:
        """One embedding per input (text, or a list of token ids), in input order; `dimensions` truncates a
        Matryoshka model's embeddings (renormalized)."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        token_ids = [self.tokenizer.encode(i) if isinstance(i, str) else list(i) for i in inputs]
        outputs = self._pool(token_ids, [PoolingParams(dimensions=dimensions)] * len(token_ids), use_tqdm)
        return [EmbeddingOutput(o.prompt_token_ids, decode_vector(o.pooled).tolist()) for o in outputs]

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str],
              use_tqdm: bool = True) -> list[ScoreOutput]:
        """A cross-encoder's relevance of each pair: one `text_1` against every `text_2`, or pairwise."""
        firsts = [text_1] if isinstance(text_1, str) else list(text_1)
        seconds = [text_2] if isinstance(text_2, str) else list(text_2)
        if len(firsts) == 1:
            firsts = firsts * len(seconds)
        if len(firsts) != len(seconds):
            raise ValueError(f"got {len(firsts)} first texts for {len(seconds)} second texts")
        pairs = [encode_pair(self.tokenizer, a, b) for a, b in zip(firsts, seconds)]
        outputs = self._pool([ids for ids, _ in pairs], [pooling for _, pooling in pairs], use_tqdm)
        return [ScoreOutput(o.prompt_token_ids, float(decode_vector(o.pooled)[0])) for o in outputs]

    def _pool(self, token_ids: list[list[int]], poolings: list[PoolingParams], use_tqdm: bool) -> list[RequestOutput]:
        if self.core.pooler_info is None:
            raise ValueError(f"this model's task is {self.config.task}; start it with task='embed' or 'score'")
        for ids, pooling in zip(token_ids, poolings):
            validate_pooling_prompt(ids, pooling, self.core.pooler_info, max_model_len=self.core.max_model_len,
                                    vocab_size=self.core.vocab_size)
        request_ids = []
        for ids, pooling in zip(token_ids, poolings):
            request_id = str(next(self._ids))
            self.core.add_request(request_id, ids, POOLING_SAMPLING, pooling=pooling)
            self.output_processor.add_request(request_id, None, ids, POOLING_SAMPLING)
            request_ids.append(request_id)
        return self._run(request_ids, use_tqdm)

    def _add_all(self, texts: Sequence[str | None], token_ids: Sequence[list[int]], params: Sequence[SamplingParams],
                 priorities: Sequence[int], lora_names: Sequence[str | None],
                 kv_parents: Sequence[str | None] | None = None) -> list[str]:
        """Validates every prompt, then queues them all: a bad one raises InvalidParameterError before any is
        queued. With `kv_parents` (beam search's steps) each request keeps its K/V and forks from its parent's."""
        for ids, p in zip(token_ids, params):
            validate_prompt(ids, p, max_model_len=self.core.max_model_len, vocab_size=self.core.vocab_size)
        request_ids = []
        for i, (text, ids, p, priority, lora_name) in enumerate(zip(texts, token_ids, params, priorities, lora_names)):
            request_id = str(next(self._ids))
            self.core.add_request(request_id, ids, p, priority=priority, lora_name=lora_name,
                                  kv_parent=kv_parents[i] if kv_parents is not None else None,
                                  keep_kv=kv_parents is not None)
            self.output_processor.add_request(request_id, text, ids, p)
            request_ids.append(request_id)
        return request_ids

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(request_ids), desc="generating", unit="req", disable=not use_tqdm)
        start, num_output_tokens = time.perf_counter(), 0
        try:
            while self.core.has_unfinished_requests():
                core_outputs = self.core.step()
                num_output_tokens += sum(len(o.new_token_ids) for o in core_outputs)
                request_outputs, to_stop = self.output_processor.process(core_outputs)
                self.core.finish_requests(to_stop, RequestStatus.FINISHED_STOPPED)
                for output in request_outputs:
                    if output.finished:
                        finished[output.request_id] = output
                        progress.update(1)
                progress.set_postfix(out_tok_s=f"{num_output_tokens / (time.perf_counter() - start):.1f}",
                                     kv=f"{self.core.kv_usage:.0%}", refresh=False)
        finally:
            progress.close()
        return [finished[request_id] for request_id in request_ids]


def _broadcast_lora_names(lora_name: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    if lora_name is None or isinstance(lora_name, str):
        return [lora_name] * n
    if len(lora_name) != n:
        raise ValueError(f"got {len(lora_name)} LoRA names for {n} prompts")
    return list(lora_name)


def _broadcast(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return list(params)
