import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

WORDS = ["hello", "world", "café", "naïve", "日本語", "東京", "🙂", "👍🏽",
         "the", "cat", "STOP", "end", ".", "\n"]
EOS = "<eos>"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(random.Random(i).choices(WORDS, k=30)) for i in range(200)]
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def byte_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, so that every multi-byte character is split across tokens."""
    return [tokenizer.token_to_id(_BYTE_TO_CHAR[b]) for b in text.encode()]


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet: printable bytes map to themselves, the others to code points from 256 on.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_TO_CHAR = _bytes_to_unicode()


def random_ids(tokenizer: Tokenizer, rng: random.Random, num_words: int) -> list[int]:
    """Ids of random text, each word either tokenized normally or byte by byte."""
    ids = []
    for word in rng.choices(WORDS, k=num_words):
        word = " " + word if rng.random() < 0.5 else word
        ids += tokenizer.encode(word).ids if rng.random() < 0.5 else byte_token_ids(tokenizer, word)
    return ids


def feed(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None,
         on_update=None) -> str | None:
    """Feeds ids in chunks of 1-3 tokens (1 without rng); returns the stop string hit, if any."""
    done = 0
    while done < len(ids):
        size = rng.randint(1, 3) if rng else 1
        stop = detok.update(ids[done:done + size], done)
        done += size
        if on_update:
            on_update(detok)
        if stop is not None:
            return stop
    return None


def test_byte_tokens_exist(tokenizer):
    ids = byte_token_ids(tokenizer, "日🙂")
    assert len(ids) == 7 and tokenizer.decode(ids) == "日🙂"


def test_incremental_text_equals_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        prompt = random_ids(tokenizer, rng, rng.randint(0, 4))
        ids = random_ids(tokenizer, rng, rng.randint(1, 12))
        detok = IncrementalDetokenizer(tokenizer, SamplingParams(), prompt)
        expected = tokenizer.decode(ids)

        def check(d: IncrementalDetokenizer) -> None:
            assert "\ufffd" not in d.output_text
            assert expected.startswith(d.output_text)

        feed(detok, ids, rng, on_update=check)
        assert detok.output_text == expected
        assert detok.take_delta(finished=True) == expected


def test_arbitrary_ids_match_full_decode(tokenizer):
    # Random ids make invalid UTF-8 too: shown as U+FFFD like a full decode, except an incomplete tail, held back.
    rng = random.Random(1)
    vocab_size = tokenizer.get_vocab_size()
    for _ in range(200):
        ids = [rng.randrange(1, vocab_size) for _ in range(rng.randint(1, 20))]
        detok = IncrementalDetokenizer(tokenizer, SamplingParams(), [])
        feed(detok, ids, rng)
        expected = tokenizer.decode(ids)
        if expected.endswith("\ufffd"):
            assert expected.startswith(detok.output_text)
        else:
            assert detok.output_text == expected


def test_prompt_ending_in_a_split_character(tokenizer):
    # The prompt's last tokens are the first bytes of "日"; the stream starts without them.
    prompt = tokenizer.encode("hello").ids + byte_token_ids(tokenizer, "日")[:2]
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(), prompt)
    feed(detok, tokenizer.encode(" world").ids)
    assert detok.output_text == " world"


def test_special_tokens(tokenizer):
    eos_id = tokenizer.token_to_id(EOS)
    ids = tokenizer.encode("hello").ids + [eos_id] + tokenizer.encode(" cat").ids
    for skip, expected in ((True, "hello cat"), (False, "hello<eos> cat")):
        detok = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=skip), [])
        feed(detok, ids)
        assert detok.output_text == expected


def stream(tokenizer, text: str, params: SamplingParams, byte_tokens: bool = True):
    """Feeds `text` one token at a time, taking a delta after each; returns (stop hit, detokenizer, deltas)."""
    ids = byte_token_ids(tokenizer, text) if byte_tokens else tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer, params, [])
    deltas = []
    stop = feed(detok, ids, on_update=lambda d: deltas.append(d.take_delta(finished=False)))
    deltas.append(detok.take_delta(finished=True))
    return stop, detok, deltas


def test_stop_string_across_token_boundaries(tokenizer):
    # Byte tokens put every character, "日" included, in several tokens.
    stop, detok, deltas = stream(tokenizer, "hello 日本 STOP café", SamplingParams(stop=["本 ST"]))
    assert stop == "本 ST"
    assert detok.output_text == "hello 日"
    assert "".join(deltas) == "hello 日"
    assert all("本" not in d for d in deltas)


def test_streamed_deltas_hold_back_a_possible_stop_prefix(tokenizer):
    stop, detok, deltas = stream(tokenizer, "hello STOP", SamplingParams(stop=["STOP", "xy"]))
    assert stop == "STOP"
    assert "".join(deltas) == detok.output_text == "hello "
    # Nothing was streamed that is not in the final text; the held-back "ST" never went out.
    assert all("S" not in d for d in deltas)

    # Without a stop hit, the held-back tail comes out when the request finishes.
    stop, detok, deltas = stream(tokenizer, "hello STO", SamplingParams(stop=["STOP"]))
    assert stop is None
    assert deltas[-1] == "STO"
    assert "".join(deltas) == "hello STO"


def test_include_stop_str_in_output(tokenizer):
    params = SamplingParams(stop=["STOP"], include_stop_str_in_output=True)
    stop, detok, deltas = stream(tokenizer, "hello STOP end", params)
    assert stop == "STOP"
    assert detok.output_text == "hello STOP"
    assert "".join(deltas) == "hello STOP"


def test_earliest_stop_string_wins_within_one_update(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["end", "cat"]), [])
    assert detok.update(tokenizer.encode("the cat and the end").ids, 0) == "cat"
    assert detok.output_text == "the "
    assert detok.stop_string_hit == "cat"


def test_text_after_the_stop_string_in_the_same_update_is_cut(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["cat"], include_stop_str_in_output=True), [])
    assert detok.update(tokenizer.encode("the cat and the end").ids, 0) == "cat"
    assert detok.output_text == "the cat"


def test_min_tokens_delays_stop_strings(tokenizer):
    ids = tokenizer.encode("cat cat").ids
    first_cat = len(tokenizer.encode("cat").ids)
    # The first "cat" ends inside the first min_tokens tokens: ignored; the second one stops.
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["cat"], min_tokens=first_cat), [])
    assert feed(detok, ids) == "cat"
    assert detok.output_text == "cat "

    # A stop string completed by token min_tokens + 1 counts, even though it began earlier.
    ids = byte_token_ids(tokenizer, "xcat")
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["cat"], min_tokens=3), [])
    assert feed(detok, ids) == "cat"
    assert detok.output_text == "x"

    # The same holds when all tokens arrive in one update.
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["cat"], min_tokens=4), [])
    assert detok.update(ids, 0) is None
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["cat"], min_tokens=3), [])
    assert detok.update(ids, 0) == "cat"


def test_stop_terminated_drops_the_stop_token_text(tokenizer):
    hello, cat = tokenizer.encode("hello").ids, tokenizer.encode(" cat").ids
    for include, expected in ((False, "hello"), (True, "hello cat")):
        detok = IncrementalDetokenizer(tokenizer, SamplingParams(include_stop_str_in_output=include), [])
        detok.update(hello, 0)
        detok.update(cat, len(hello), stop_terminated=True)
        assert detok.take_delta(finished=True) == expected


def test_hf_fast_tokenizer_and_prompt_context():
    # A SentencePiece-style decoder drops the first token's leading space; after the prompt it must stay.
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.decoder = decoders.Metaspace()
    assert tokenizer.decode([2]) == "world"
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(), prompt_token_ids=[1])
    feed(detok, [2, 2])
    assert detok.output_text == " world world"

    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    detok = IncrementalDetokenizer(hf, SamplingParams(), prompt_token_ids=[1])
    feed(detok, [2])
    assert detok.output_text == " world"


def test_recovers_when_a_decoder_rewrites_earlier_text():
    class Shout:
        """Upper-cases everything once a "!" appears, so decode(a + b) does not start with decode(a)."""

        def decode_chain(self, tokens: list[str]) -> list[str]:
            return [t.upper() for t in tokens] if "!" in tokens else tokens

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "!": 1, "b": 2}, unk_token="a"))
    tokenizer.decoder = decoders.Decoder.custom(Shout())
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(), [])
    feed(detok, [0, 1, 2])
    # The fresh stream starts at "!" and upper-cases what follows; the text already out stays as it was.
    assert detok.output_text == "a!B"
