"""Logits -> next tokens (+ logprobs) for the rows of a batch that need one.

The sampler owns the per-step sampling math; it does not know about the scheduler, the KV cache or stop checks.
`SamplingMetadata.from_rows` turns the batch's sampling rows (the runner's copies of their requests) into tensors,
building only what some row uses, so a plain greedy batch costs an argmax.

Order of operations in `Sampler.__call__`:
  1. Logprobs, when any row asked for them, come from the RAW logits (log_softmax before any processing, like
     vLLM's default), so they describe the model, not our sampling settings.
  2. Structured outputs: tokens the row's grammar forbids get -inf (xgrammar's bitmask, one kernel).
     Logit bias is added.
  3. Token masks: rows with fewer than min_tokens outputs get their EOS and stop token ids masked to -inf, and so
     do bad words (a one-token word always; a longer word's last token when the output ends with its others);
     rows with allowed_token_ids get every other token masked.
  4. Penalties: repetition (HF/vLLM: for tokens seen in prompt or output, positive logits are divided by the
     penalty and negative ones multiplied), then frequency and presence over OUTPUT tokens only (OpenAI:
     logit -= count * frequency + (count > 0) * presence).
  5. Greedy rows (temperature 0) take the argmax of the logits from step 4.
  6. Random rows: divide by temperature, mask with top-k then top-p then min-p, softmax.
  7. Sample with the exponential race: argmax(probs / q), q ~ Exp(1).
     Verifying speculative drafts replaces 5-7 with rejection sampling (`rejection_sample`). Seeded rows draw q from their own generator
     row by row, so a seeded request samples the same token whatever else shares the batch; unseeded rows draw
     from the global RNG in one call.
Everything stays on the logits' device; nothing here waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.device import to_device

if TYPE_CHECKING:
    from engine.input_batch import ScheduledRow


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters as tensors on the sampling device. None means no row uses the feature."""

    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None  # [n] float32; 1.0 on greedy rows so that dividing is harmless
    greedy_mask: torch.Tensor | None  # [n] bool; only when the batch mixes greedy and random rows
    top_k: torch.Tensor | None  # [n] int64, 0 = no top-k
    top_p: torch.Tensor | None  # [n] float32, 1.0 = no top-p
    min_p: torch.Tensor | None  # [n] float32, 0.0 = no min-p
    generators: list[torch.Generator | None]  # per row, None when unseeded
    # Penalties. Token ids are padded with -1; prompt ids only exist when some row has a repetition penalty.
    repetition_penalties: torch.Tensor | None  # [n] float32
    frequency_penalties: torch.Tensor | None  # [n] float32
    presence_penalties: torch.Tensor | None  # [n] float32
    prompt_token_ids: torch.Tensor | None  # [n, max_prompt_len] int64
    output_token_ids: torch.Tensor | None  # [n, max_output_len] int64
    # Sparse (row, token id) lists: a handful of entries, never a [n, vocab] tensor.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, token ids, biases
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # rows, token ids to forbid (min_tokens, bad words)
    allowed: tuple[torch.Tensor, torch.Tensor] | None  # rows, token ids: the only ones those rows may sample
    max_num_logprobs: int | None  # the largest `logprobs` over rows; None when no row wants logprobs
    # Structured outputs: xgrammar's packed bitmask of allowed tokens ([k, ceil(vocab / 32)] int32, on the device)
    # and the batch row of each of its k rows.
    grammar_bitmask: tuple[torch.Tensor, list[int]] | None = None

    @classmethod
    def from_rows(cls, rows: list[ScheduledRow], device: torch.device) -> SamplingMetadata:
        device = torch.device(device)
        requests = [row.state for row in rows]
        params = [r.sampling_params for r in requests]
        greedy = [p.is_greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)
        random_params = [p for p in params if not p.is_greedy]

        def column(values, dtype: torch.dtype) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=dtype), device)

        def column_if(used: bool, values, dtype: torch.dtype) -> torch.Tensor | None:
            return column(values, dtype) if used else None

        needs_penalties = any(p.needs_penalties for p in params)
        needs_prompt = any(p.repetition_penalty != 1.0 for p in params)

        bias_entries = [(row, token_id, bias) for row, p in enumerate(params)
                        for token_id, bias in (p.logit_bias or {}).items()]
        banned = [(i, token_id) for i, row in enumerate(rows) for token_id in _banned(row)]
        allowed_entries = [(row, token_id) for row, p in enumerate(params) for token_id in p.allowed_token_ids or ()]
        logit_bias = min_tokens_mask = allowed = None
        if bias_entries:
            rows, token_ids, biases = zip(*bias_entries)
            logit_bias = column(rows, torch.int64), column(token_ids, torch.int64), column(biases, torch.float32)
        if banned:
            rows, token_ids = zip(*banned)
            min_tokens_mask = column(rows, torch.int64), column(token_ids, torch.int64)
        if allowed_entries:
            rows, token_ids = zip(*allowed_entries)
            allowed = column(rows, torch.int64), column(token_ids, torch.int64)
        logprobs = [p.logprobs for p in params if p.logprobs is not None]

        return cls(
            all_greedy=all_greedy,
            all_random=all_random,
            temperature=None if all_greedy else column([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                                                       torch.float32),
            greedy_mask=None if all_greedy or all_random else column(greedy, torch.bool),
            top_k=column_if(any(p.top_k > 0 for p in random_params), [p.top_k for p in params], torch.int64),
            top_p=column_if(any(p.top_p < 1.0 for p in random_params), [p.top_p for p in params], torch.float32),
            min_p=column_if(any(p.min_p > 0.0 for p in random_params), [p.min_p for p in params], torch.float32),
            generators=[r.generator(device) for r in requests],
            repetition_penalties=column_if(needs_penalties, [p.repetition_penalty for p in params], torch.float32),
            frequency_penalties=column_if(needs_penalties, [p.frequency_penalty for p in params], torch.float32),
            presence_penalties=column_if(needs_penalties, [p.presence_penalty for p in params], torch.float32),
            prompt_token_ids=_padded(
                [r.prompt_token_ids for r in requests], device) if needs_prompt else None,
            output_token_ids=_padded(
                [r.output_token_ids for r in requests], device) if needs_penalties else None,
            logit_bias=logit_bias,
            min_tokens_mask=min_tokens_mask,
            allowed=allowed,
            max_num_logprobs=max(logprobs) if logprobs else None,
        )


@dataclass
class LogprobsTensors:
    token_ids: torch.Tensor  # [n, k + 1] int64: the sampled (or target) token first, then the top k
    logprobs: torch.Tensor  # [n, k + 1] float32
    ranks: torch.Tensor  # [n] int64: rank of the first column's token, 1 = most likely

    def tolists(self) -> tuple[list[list[int]], list[list[float]], list[int]]:
        """(token ids, logprobs, ranks) as Python lists; this copies to the host, so call it once per step."""
        return self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [n] int64
    # k = max_num_logprobs over the batch; a row that asked for fewer keeps its first logprobs + 1 columns.
    logprobs: LogprobsTensors | None
    accepted: torch.Tensor | None = None  # [n] bool, when verifying drafts: the row's draft was accepted


class Sampler:
    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata, draft_token_ids: torch.Tensor | None = None,
                 draft_probs: torch.Tensor | None = None) -> SamplerOutput:
        """`draft_token_ids` ([n], -1 where a row has none): speculative decoding's verification, where each row
        is one position of a request's drafts and the output says which drafts were accepted (`rejection_sample`);
        `draft_probs` ([n, vocab]): the distribution each draft was drawn from, when not one-hot."""
        # logits: [n, vocab] float32; left untouched (every step below returns a new tensor).
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = process_logits(logits, metadata)
        accepted = None
        if draft_token_ids is None:
            sampled = _sample(logits, metadata)
        else:
            sampled, accepted = rejection_sample(logits, metadata, draft_token_ids, draft_probs)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs, accepted=accepted)


def process_logits(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Steps 2-4: grammar, logit bias, token masks and penalties (the input stays untouched)."""
    if metadata.grammar_bitmask is not None:
        logits = _apply_grammar_bitmask(logits, *metadata.grammar_bitmask)
    if metadata.logit_bias is not None:
        rows, token_ids, biases = metadata.logit_bias
        logits = logits.index_put((rows, token_ids), biases, accumulate=True)
    if metadata.min_tokens_mask is not None:
        rows, token_ids = metadata.min_tokens_mask
        # A filled tensor rather than a scalar one: copying a scalar to the device would wait for it.
        logits = logits.index_put((rows, token_ids), torch.full_like(token_ids, float("-inf"), dtype=logits.dtype))
    if metadata.allowed is not None:
        logits = apply_allowed_token_ids(logits, *metadata.allowed)
    if metadata.output_token_ids is not None:
        logits = apply_penalties(logits, metadata.prompt_token_ids, metadata.output_token_ids,
                                 metadata.repetition_penalties, metadata.frequency_penalties,
                                 metadata.presence_penalties)
    return logits


def compute_prompt_logprobs(logits: torch.Tensor, target_token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Logprobs of each prompt position's next prompt token, plus the top `num_top`, from the raw logits.

    logits: [n, vocab] for n prompt positions; target_token_ids: [n], the token that follows each position.
    """
    return _gather_logprobs(torch.log_softmax(logits, dim=-1), target_token_ids, num_top)


def apply_allowed_token_ids(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Masks to -inf every token but the listed ones in the listed rows; other rows stay as they are."""
    restricted = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device).index_fill_(0, rows, True)
    allowed = torch.zeros_like(logits, dtype=torch.bool)
    allowed.index_put_((rows, token_ids), torch.ones_like(rows, dtype=torch.bool))
    return logits.masked_fill(restricted.unsqueeze(1) & ~allowed, float("-inf"))


def _banned(row: ScheduledRow) -> list[int]:
    """The tokens this row may not sample now: its EOS and stop ids while under min_tokens, and its bad words'
    last tokens where the output ends with the words' other tokens."""
    state, params = row.state, row.state.sampling_params
    banned = set()
    if row.num_prior_outputs < params.min_tokens:
        banned |= set(state.eos_token_ids) | set(params.stop_token_ids)
    if params.bad_words_token_ids:
        outputs = state.output_token_ids
        for *prefix, last in params.bad_words_token_ids:
            if not prefix or (len(outputs) >= len(prefix) and outputs[len(outputs) - len(prefix):] == prefix):
                banned.add(last)
    return sorted(banned)


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor | None,
    output_token_ids: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Repetition, frequency and presence penalties; token ids are [n, len] padded with -1.

    prompt_token_ids may be None when no row has a repetition penalty: it is only needed for that one.
    """
    vocab_size = logits.shape[-1]
    output_counts = _token_counts(output_token_ids, vocab_size)  # [n, vocab]
    in_output = output_counts > 0
    if prompt_token_ids is not None:
        seen = in_output | (_token_counts(prompt_token_ids, vocab_size) > 0)
        penalty = torch.where(seen, repetition_penalties.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    return (logits - output_counts * frequency_penalties.unsqueeze(1)
            - in_output * presence_penalties.unsqueeze(1))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Masks to -inf all but each row's top_k logits (0 = no limit), then all but the smallest set of the rest whose
    probability reaches top_p (the most likely token always stays). One sort serves both."""
    if top_k is None and top_p is None:
        return logits
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, vocab]
    positions = torch.arange(vocab_size, device=logits.device)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab_size).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(positions >= k, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        # The mass of the strictly more likely tokens: a token goes once they alone reach top_p. It is 0 for the
        # first token, so that one always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Masks tokens whose probability is below min_p times the row's top probability (compared as logits, which
    needs no softmax: p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p))."""
    if min_p is None:
        return logits
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)  # log(0) = -inf keeps every token
    return logits.masked_fill(logits < threshold, float("-inf"))


def grammar_bitmask(structured_req_ids: list[str], packed: bytes, rows: list[ScheduledRow],
                    device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The step's grammar bitmask (engine.contract's bytes) widened to every sampling row (all tokens allowed on
    rows without a grammar: xgrammar indexes the logits and the bitmask alike), on the device; and the structured
    rows."""
    row_of = {row.state.req_id: i for i, row in enumerate(rows)}
    words = np.frombuffer(packed, dtype=np.int32).reshape(len(structured_req_ids), -1)
    structured_rows = [row_of[req_id] for req_id in structured_req_ids]
    if structured_rows != list(range(len(rows))):
        # numpy's fill: torch's parallel one woke the host's OpenMP threads for a ms on a 16-core machine
        widened = np.full((len(rows), words.shape[1]), -1, dtype=np.int32)
        widened[structured_rows] = words
        words = widened
    return to_device(torch.from_numpy(words if words.flags.writeable else words.copy()), device), structured_rows


def _apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Disallowed tokens of the structured rows -> -inf, in one kernel (xgrammar's, on CPU or CUDA)."""
    import xgrammar as xgr

    logits = logits.clone()  # the caller's logits stay untouched, as with every step here
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=rows)
    return logits


def _sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    greedy = None if metadata.all_random else logits.argmax(dim=-1)
    if metadata.all_greedy:
        return greedy

    sampled = sample_from(target_probs(logits, metadata), metadata.generators)
    return sampled if greedy is None else torch.where(metadata.greedy_mask, greedy, sampled)


def rejection_sample(logits: torch.Tensor, metadata: SamplingMetadata, draft_token_ids: torch.Tensor,
                     draft_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative decoding's verification, which keeps the target distribution exactly (Leviathan et al., 2023).

    Row i is one position of a request: `draft_token_ids[i]` is the draft proposed there, -1 at the position after
    the last draft (the bonus token). A random row accepts its draft d with probability min(1, p(d) / q(d)) and
    otherwise samples from norm(max(0, p - q)), where q is the distribution d was drawn from: `draft_probs[i]` (a
    draft model's), or, without them, one-hot at d (the n-gram proposer), which makes these p(d) and p without d. A
    greedy row accepts d when it is the argmax, and otherwise takes the argmax. Returns each row's token (d when
    accepted) and whether its draft was accepted; the caller emits a request's tokens up to and including its first
    row whose draft was not accepted.
    """
    greedy = None if metadata.all_random else logits.argmax(dim=-1)
    if metadata.all_greedy:
        return greedy, greedy == draft_token_ids
    probs = target_probs(logits, metadata)
    has_draft = draft_token_ids >= 0
    drafts = draft_token_ids.clamp(min=0).unsqueeze(1)
    target_at_draft = probs.gather(1, drafts).squeeze(1)
    uniform = random_like(target_at_draft.unsqueeze(1), metadata.generators, torch.Tensor.uniform_).squeeze(1)
    if draft_probs is None:
        accepted = has_draft & (uniform < target_at_draft)
        residual = probs.scatter(1, drafts, 0.0)
    else:
        accepted = has_draft & (uniform * draft_probs.gather(1, drafts).squeeze(1) < target_at_draft)
        residual = (probs - draft_probs).clamp_(min=0.0)
    residual = torch.where(has_draft.unsqueeze(1), residual, probs)
    sampled = torch.where(accepted, draft_token_ids, sample_from(residual, metadata.generators))
    if greedy is None:
        return sampled, accepted
    return (torch.where(metadata.greedy_mask, greedy, sampled),
            torch.where(metadata.greedy_mask, greedy == draft_token_ids, accepted))


def target_probs(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Step 6's distribution of the random rows: temperature, top-k, top-p, min-p, softmax."""
    logits = logits / metadata.temperature.unsqueeze(1)
    logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
    logits = apply_min_p(logits, metadata.min_p)
    return logits.softmax(dim=-1)


def sample_from(weights: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row, with probability proportional to the row's weights (which it overwrites)."""
    return weights.div_(random_like(weights, generators, torch.Tensor.exponential_)).argmax(dim=-1)


def random_like(tensor: torch.Tensor, generators: list[torch.Generator | None], draw) -> torch.Tensor:
    """Random numbers shaped like `tensor` from `draw` (an in-place tensor method such as exponential_): seeded
    rows from their own generator, row by row, the others from the global RNG in one call."""
    values = torch.empty_like(tensor)
    if any(generator is None for generator in generators):
        draw(values)
    for row, generator in enumerate(generators):
        if generator is not None:
            draw(values[row], generator=generator)
    return values


def _gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    token_logprobs = logprobs.gather(-1, token_ids.unsqueeze(1))  # [n, 1]
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)  # [n, num_top]
    return LogprobsTensors(
        token_ids=torch.cat([token_ids.unsqueeze(1), top_ids], dim=1),
        logprobs=torch.cat([token_logprobs, top_logprobs], dim=1),
        ranks=(logprobs > token_logprobs).sum(dim=-1) + 1,
    )


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, len] token ids padded with -1 -> [n, vocab] counts; padding lands in an extra column that is dropped."""
    n = token_ids.shape[0]
    counts = torch.zeros(n, vocab_size + 1, dtype=torch.int64, device=token_ids.device)
    token_ids = torch.where(token_ids < 0, vocab_size, token_ids)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids))
    return counts[:, :vocab_size]


def _padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(map(len, rows))
    return to_device(torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.int64), device)

