"""Detokenization and stop sequences."""

from __future__ import annotations

from router.stopping import StopCondition, TextStream


def stream(tokenizer, stops=(), max_new=100, ignore_eos=False) -> TextStream:
    condition = StopCondition(tokenizer.eos_token_ids, max_new, tuple(stops), ignore_eos)
    return TextStream(tokenizer.detokenizer([]), condition)


def feed(s: TextStream, ids: list[int]) -> str:
    out = []
    for token in ids:
        out.append(s.push(token))
        if s.finish:
            break
    return "".join(out)


def test_streamed_text_equals_whole_decode(tokenizer):
    text = "Héllo wörld — emoji 🚂 and 中文 text."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert feed(stream(tokenizer), ids) == tokenizer.hf.decode(ids)


def test_stop_sequence_straddling_tokens_is_cut_and_never_emitted(tokenizer):
    ids = tokenizer.encode("The train leaves at noon. Bring tickets.", add_special_tokens=False)
    s = stream(tokenizer, stops=["noon. Br"])
    pieces = []
    for token in ids:
        pieces.append(s.push(token))
        assert "noon" not in "".join(pieces), "held-back text leaked before the match was decided"
        if s.finish:
            break
    assert "".join(pieces) == "The train leaves at " and s.finish == "stop_sequence"


def test_eos_stops_without_text_and_ignore_eos_continues(tokenizer):
    eos = next(iter(tokenizer.eos_token_ids))
    hello = tokenizer.encode("hello", add_special_tokens=False)
    s = stream(tokenizer)
    assert feed(s, [*hello, eos, *hello]) == "hello" and s.finish == "stop"
    s = stream(tokenizer, ignore_eos=True, max_new=len(hello) * 2 + 1)
    feed(s, [*hello, eos, *hello])
    assert s.finish == "length"


def test_length_limit(tokenizer):
    s = stream(tokenizer, max_new=2)
    feed(s, tokenizer.encode("one two three four", add_special_tokens=False))
    assert s.finish == "length" and s.generated == 2


def test_held_back_prefix_is_released_when_it_does_not_match(tokenizer):
    ids = tokenizer.encode("abc abd", add_special_tokens=False)
    s = stream(tokenizer, stops=["abx"])
    assert feed(s, ids) + s.text[s.emitted :] == "abc abd"
