"""Build tiny, randomly initialized Hugging Face checkpoints for tests and demos.

This module owns the one recipe for a "tiny model" folder: a byte-level BPE
tokenizer trained offline on an embedded corpus, a small transformers config for
each supported architecture family, and random (but deterministic) weights. The
folder uses the standard Hugging Face layout, so both transformers and kvbox's
own loader can read it, which makes it the reference for comparing the two.

    python -m engine.tools.tiny_model llama3 /tmp/tiny-llama3 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import torch

from engine.tools.tiny_encoder import ENCODER_FAMILIES, build_tiny_encoder
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2")  # the decoders
ALL_FAMILIES = FAMILIES + ENCODER_FAMILIES

BOS, EOS, IM_START, IM_END, PAD = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pad|>",
)
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END, PAD)
VOCAB_SIZE = 512  # including the special tokens, which take the last ids as in Llama 3 / Qwen

# Qwen2's split pattern (GPT-4 style, digits one at a time). transformers 5
# rebuilds any "qwen2" tokenizer from vocab + merges with this pattern and NFC,
# ignoring tokenizer.json's pipeline, so every family uses it to stay identical.
_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Embedded rather than read from disk so the tokenizer is identical on every
# machine and Python version. Mixed content gives merges for prose, code and
# digits; the non-ASCII lines make multi-byte UTF-8 characters span tokens.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving engine keeps a cache of
keys and values for every request, and it reuses blocks of that cache when two
prompts share a prefix. When the cache is full, the scheduler preempts the
youngest request and recomputes it later. Throughput matters, but so does the
latency of the first token, which users notice the most.

Once upon a time, in a small village by the sea, there lived an old fisherman
who told stories to anyone who would listen. "The weather will turn," he said,
"and the boats must come home before the evening bell." Nobody believed him,
yet every evening the wind rose exactly as he had promised. Children laughed;
their parents sighed; the gulls circled over the harbour, crying loudly.

Questions and answers: What is the capital of France? Paris. How many days are
in a leap year? 366. Is the sky blue? Usually, yes! Why? Because air scatters
short wavelengths of sunlight more strongly than long ones.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]

for i in range(10):
    print(f"{i:>3} -> {fibonacci(i)}")

class Request:
    def __init__(self, prompt, max_tokens=16, temperature=0.7):
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.temperature = temperature

{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}
if (x >= 0 && y != 1) { return x * y + 42; } else { return -1; }
SELECT name, count(*) FROM users WHERE age > 21 GROUP BY name ORDER BY 2 DESC;

Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 15 20 32 64 100 128 256 512 1000 1024 2048
3.14159 2.71828 -0.5 1e-6 6.02e23 $19.99 50% 12:30 2024-06-01 +1 (555) 010-9999
Punctuation: commas, periods. Colons: semicolons; dashes - and -- and ... and
(parentheses) [brackets] {braces} <angles> 'single' "double" `back` ~tilde^ #hash
@at &and *star _under |pipe \\back /slash ?question !bang = plus+ minus-

Non-ASCII text: a café on the corner serves crème brûlée to a naïve tourist.
Grüße aus München! ¿Dónde está la estación? Ça va très bien, merci.
日本語のテキストも少し含めます。東京は大きな都市です。
中文也可以：你好，世界。한국어 문장도 있습니다.
Ωμέγα and αλφα are Greek letters; Привет, мир! Emoji: 🙂 🚀 ✨ 👍🏽 ❤️

The engine streams tokens back to the client as soon as they are sampled. Each
token is decoded incrementally, because a single character such as é or 日 may
need more than one token before it can be printed. Greedy decoding picks the
most likely token; sampling draws from the softmax with temperature, top-k and
top-p filters. Stop strings end generation early, and so does the end token.
"""


def _train_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Added after training so they get the highest ids, as in real checkpoints.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    # unk_token=None is saved explicitly (as in real Qwen2 checkpoints); otherwise
    # transformers' Qwen2Tokenizer adds its default "<|endoftext|>", growing the vocab.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(family: str, vocab_size: int, special_ids: dict[str, int], overrides: dict):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=special_ids[BOS],
        eos_token_id=special_ids[EOS],
        pad_token_id=special_ids[PAD],
    )
    if family == "llama":
        cls, extra = LlamaConfig, {}
    elif family == "llama3":
        # original_max_position_embeddings is tiny so that, with head_dim 16, the
        # three llama3 bands (kept, smoothed, divided by factor) all occur.
        cls, extra = LlamaConfig, dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        )
    elif family == "mistral":
        cls, extra = MistralConfig, dict(sliding_window=16)
    elif family == "qwen2":
        cls, extra = Qwen2Config, dict(use_sliding_window=False)
    elif family == "qwen3":
        cls, extra = Qwen3Config, dict(tie_word_embeddings=True)
    else:  # gemma2; build_tiny_model has validated the name
        # Four layers so the sliding/global alternation repeats.
        cls, extra = Gemma2Config, dict(
            num_hidden_layers=4,
            query_pre_attn_scalar=16,
            sliding_window=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
    return cls(**{**common, **extra, **overrides})


@torch.no_grad()
def _randomize(model: torch.nn.Module, family: str, seed: int) -> None:
    # transformers' own init gives near-zero biases and unit norms, which would
    # leave code paths untested and logits close to ties; larger random values
    # make a wrong implementation visibly disagree with the reference.
    gen = torch.Generator().manual_seed(seed)
    norm_center = 0.0 if family == "gemma2" else 1.0  # Gemma norms scale by (1 + w)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
        if name.endswith("norm.weight"):
            param.copy_(norm_center + 0.1 * noise)
        elif name.endswith(".bias"):
            param.copy_(0.1 * noise)
        else:
            param.copy_(0.2 * noise)


def build_tiny_model(family: str, out_dir: str | os.PathLike, *, seed: int = 0, **config_overrides) -> pathlib.Path:
    """Write a tiny random `family` checkpoint (weights, config, tokenizer) into `out_dir` and return its path.

    `config_overrides` are passed to the transformers config class, e.g.
    `num_hidden_layers=3` or `max_position_embeddings=128`.
    """
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")
    out = pathlib.Path(out_dir)
    if family in ENCODER_FAMILIES:  # `pooling=` (mean, cls, last) adds the sentence-transformers files
        return build_tiny_encoder(family, out, _CORPUS, seed=seed, **config_overrides)
    tokenizer = _train_tokenizer()
    special_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = _config(family, len(tokenizer), special_ids, config_overrides)

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, family, seed)
    # Two EOS ids so stop handling for multi-EOS models is exercised.
    model.generation_config = GenerationConfig(
        bos_token_id=special_ids[BOS],
        eos_token_id=[special_ids[EOS], special_ids[IM_END]],
        pad_token_id=special_ids[PAD],
    )
    model.save_pretrained(out)

    tokenizer.model_max_length = config.max_position_embeddings
    # Keep the chat template inside tokenizer_config.json, where older loaders look for it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    # transformers 5 no longer writes this file, but loaders built for 4.x read it.
    (out / "special_tokens_map.json").write_text(json.dumps(tokenizer.special_tokens_map, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.tools.tiny_model", description="Build a tiny random Hugging Face checkpoint."
    )
    parser.add_argument("family", choices=ALL_FAMILIES)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.family, args.out_dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
