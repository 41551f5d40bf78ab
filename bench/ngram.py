"""N-gram speculation on real weights: the built-in SmolLM2-135M-Instruct, copy-heavy chat prompts, greedy.

    python bench/ngram.py --device cpu                       # batch 1 and 8, k 2 and 4, against speculation off
    python bench/ngram.py --device cuda --max-tokens 512
    python bench/ngram.py --device cpu --num-prompts 2 --max-tokens 16 --batches 1 --ks 2   # smoke
    python bench/ngram.py --device cuda --mixed-eager        # mixed verify steps eager, as before #20's padding

The prompts ask the model to hand back a given text with a small edit: fix a typo planted in a function of kvbox's
own source, or rewrite a paragraph of its README replacing one word; answers then copy long runs of the prompt,
which is what prompt lookup drafts from. Each batch size runs with speculation off and with each k, in one
process, the engines taking turns wave by wave; it prints the decode rate (output tokens after each request's first, over the time after the first step),
the acceptance rate (accepted / drafted), the mean accepted length (accepted drafts per verification), the speedup
over off, and exits non-zero if a greedy output differs from the one without speculation. With CUDA graphs it also
counts the waves' steps (each wave's prefill too) by how they ran: decode graph, verify graph (uniform, or mixed: sequences with fewer drafts
padded to 1 + k), or eager.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench.common import sync  # noqa: E402
from engine import cuda_graphs  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.tokenizer import load_tokenizer, render_chat  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]


def code_prompts() -> list[str]:
    """The longest function of 45 lines at most of a few kvbox files, one identifier misspelt in each, and the
    request to fix it."""
    prompts = []
    for file in ("engine/scheduler.py", "engine/sampler.py", "engine/kv_cache/block_pool.py",
                 "engine/spec_decode/draft_model.py", "engine/config.py"):
        source = (ROOT / file).read_text()
        functions = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)
                     and node.end_lineno - node.lineno < 45]
        function = max(functions, key=lambda node: node.end_lineno - node.lineno)
        code = textwrap.dedent("\n".join(source.splitlines()[function.lineno - 1:function.end_lineno]))
        names = [n for n in re.findall(r"\b[a-z_]{6,}\b", code.partition("\n")[2]) if "_" in n]
        word = names[len(names) // 2]
        typo = word[:2] + word[3] + word[2] + word[4:]  # two letters swapped
        prompts.append(f"Fix the typo in this Python code. Reply with the whole corrected code only.\n\n```python\n"
                       f"{code.replace(word, typo, 1)}\n```")
    return prompts


def text_prompts() -> list[str]:
    """README paragraphs (the longest few) and the request to rewrite each with one word replaced."""
    paragraphs = [p.replace("\n", " ") for p in (ROOT / "README.md").read_text().split("\n\n")
                  if p[:1].isalpha() and "`" not in p[:40]]
    paragraphs = sorted(paragraphs, key=len, reverse=True)[:5]
    prompts = []
    for paragraph in paragraphs:
        word = max(re.findall(r"\b[a-z]{5,}\b", paragraph), key=paragraph.count)
        prompts.append(f"Rewrite this paragraph, replacing every \"{word}\" with \"{word.upper()}\" and changing "
                       f"nothing else.\n\n{paragraph}")
    return prompts


def chat_prompts(tokenizer, num: int) -> list[list[int]]:
    prompts = [p for pair in zip(code_prompts(), text_prompts()) for p in pair][:num]
    rendered = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return [tokenizer.encode(text, add_special_tokens=False) for text in rendered]


def make_core(args, k: int | None, max_prompt_len: int) -> EngineCore:
    speculative = None if k is None else {"method": "ngram", "num_speculative_tokens": k,
                                          "prompt_lookup_min": args.lookup_min, "prompt_lookup_max": args.lookup_max}
    return EngineCore(EngineConfig(
        model=MODEL, dtype=args.dtype, device=args.device, max_model_len=max_prompt_len + args.max_tokens,
        enable_prefix_caching=False, max_num_seqs=max(8, *args.batches), speculative_config=speculative))


class Timed:
    """One engine (speculation off, or k drafts) and what its timed waves of prompts gave."""

    def __init__(self, core: EngineCore, num_prompts: int):
        self.core, self.seconds, self.decoded = core, 0.0, 0
        self.outputs: dict[str, list[int]] = {str(i): [] for i in range(num_prompts)}
        core.add_request("warm-up", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=8))
        while core.has_unfinished_requests():
            core.step()
        self.before = core.stats().spec_decoding
        self.step_kinds: Counter[str] = Counter()
        if getattr(core.runner, "use_cuda_graphs", False):
            graphs = core.runner.cuda_graphs
            bucket = graphs.bucket
            graphs.bucket = lambda num_tokens, rows: self._count(rows, bucket(num_tokens, rows))

    def _count(self, rows, shape):
        mixed = len({row.count for row in rows}) > 1
        kind = ("eager, mixed" if mixed else "eager") if shape is None else (
            "decode graph" if shape.query_len == 1 else "verify graph, mixed" if mixed else "verify graph")
        self.step_kinds[kind] += 1
        return shape

    def wave(self, prompts: dict[int, list[int]], params: SamplingParams) -> None:
        """Runs `prompts` together; the first step (the prefill) is not timed."""
        core = self.core
        for i, prompt in prompts.items():
            core.add_request(str(i), prompt, params)
        steps = [core.step()]
        sync(core.config.device)
        start = time.perf_counter()
        while core.has_unfinished_requests():
            steps.append(core.step())
        sync(core.config.device)
        self.seconds += time.perf_counter() - start
        for output in (output for step in steps for output in step):
            self.outputs[output.request_id] += output.new_token_ids
        self.decoded += sum(len(self.outputs[str(i)]) - 1 for i in prompts)

    def counts(self) -> tuple[int, int, int]:
        """Verifications, drafts and accepted drafts of the timed waves."""
        after = self.core.stats().spec_decoding
        return (after.num_drafts - self.before.num_drafts, after.num_draft_tokens - self.before.num_draft_tokens,
                after.num_accepted_tokens - self.before.num_accepted_tokens)


def run_batch(args, prompts: list[list[int]], batch: int) -> list[dict]:
    """Speculation off and each k on waves of `batch` prompts, the engines taking turns on each wave (so that a
    shared machine's changing load falls on all of them alike); prints and returns each one's figures."""
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    engines = {k: Timed(make_core(args, k, max(map(len, prompts))), len(prompts)) for k in [None, *args.ks]}
    for start in range(0, len(prompts), batch):
        wave = {i: prompts[i] for i in range(start, min(start + batch, len(prompts)))}
        for engine in engines.values():
            engine.wave(wave, params)
    off = engines.pop(None)
    rate = off.decoded / off.seconds
    print(f"batch {batch}: off {rate:.1f} tokens/s ({sum(map(len, off.outputs.values()))} tokens)")
    results = [{"batch": batch, "k": None, "decode_tokens_per_s": rate}]
    for k, engine in engines.items():
        verifications, drafted, accepted = engine.counts()
        spec_rate, same = engine.decoded / engine.seconds, engine.outputs == off.outputs
        acceptance, mean_accepted = accepted / max(drafted, 1), accepted / max(verifications, 1)
        print(f"batch {batch}: k={k} {spec_rate:.1f} tokens/s ({spec_rate / rate:.2f}x), acceptance "
              f"{acceptance:.2f}, mean accepted length {mean_accepted:.2f} of {verifications} verifications; "
              f"greedy outputs {'identical' if same else 'DIFFER'}")
        if engine.step_kinds:
            print(f"batch {batch}: k={k} steps: " + ", ".join(f"{n} {kind}" for kind, n in engine.step_kinds.items()))
        results.append({"batch": batch, "k": k, "decode_tokens_per_s": spec_rate, "speedup": spec_rate / rate,
                        "acceptance": acceptance, "mean_accepted_length": mean_accepted, "identical": same,
                        "steps": dict(engine.step_kinds)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on the CPU, the GGUF's on CUDA")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lookup-min", type=int, default=2)
    parser.add_argument("--lookup-max", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument("--mixed-eager", action="store_true",
                        help="run mixed verify steps eagerly (no padding to the verify graph), to measure what it gains")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.mixed_eager:
        cuda_graphs.MIXED_STEP_MAX_TOKENS = 0
    if args.threads:
        torch.set_num_threads(args.threads)

    prompts = chat_prompts(load_tokenizer(MODEL), args.num_prompts)
    print(f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"max_tokens {args.max_tokens}, prompt lookup n {args.lookup_min}-{args.lookup_max}")
    results = [result for batch in args.batches for result in run_batch(args, prompts, batch)]
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if not all(result.get("identical", True) for result in results):
        raise SystemExit("greedy outputs with speculation differ from those without")


if __name__ == "__main__":
    main()
