"""Speculative decoding's guesses (SPECULATE, SPECULATIVE_METHOD) and when to make them.

Two methods. ``draft``: the shards' draft model (DRAFT_MODEL_ID) continues each
request greedily; the router only says how many guesses it wants (shard.proto,
Guesses.draft) and grows blocks for them. ``ngram``: the router's own guesses.

The n-gram proposer (prompt lookup) guesses that the tokens after the sequence's
last n tokens are those that followed the same n tokens the last time they
occurred, in the prompt or the output: free to compute, and right wherever an
answer copies its input (rewriting, extraction, code edits, RAG answers, tool
arguments). The shards verify guesses so that the output is decoding's own, bit
for bit (shard.proto, Guesses), so speculation changes speed only.

It pays when a step has spare compute: a decode step's cost is reading the
weights, and a few more rows ride along at about the cost of one, up to what the
CPU kernels compute in one tile (4 rows: a fifth costs a tile of its own; see
docs/performance.md, "Speculative decoding"). So a step's decode rows, guesses
included, stay within ``step_rows``: one stream guesses 3 tokens, two guess 1
each, a larger batch none (it already uses the compute). A request whose guesses
keep failing guesses fewer.

Guessing has a cost of its own: the guesses for a step need the token the step
before it draws, so that step's answer must be in before the next is planned,
where otherwise the router sends each step ahead of the previous one's answer
(router.step_pipeline). So the router waits for answers only while guessing
pays: while some decoding request's last guesses were found and at least one of
them kept ("hot"); otherwise it keeps sending steps ahead, and every
``PROBE_EVERY`` steps waits once to look for guesses again.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from router.request import Request

#: Longest and shortest n-gram looked up (the longest match found is used).
MAX_NGRAM, MIN_NGRAM = 3, 1
#: While no request's guesses pay, one step in this many waits for its answer to look for guesses.
PROBE_EVERY = 8


def ngram_guesses(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to ``k`` tokens that followed the last earlier occurrence of the sequence's last n tokens."""
    if k <= 0:
        return []
    data = array("I", tokens).tobytes()  # bytes.rfind searches in C
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        suffix = data[-4 * n :]
        end = len(data) - 4  # an occurrence must end before the last token
        while (at := data.rfind(suffix, 0, end)) >= 0:
            if at % 4 == 0:  # aligned on a token, not inside two
                start = at // 4 + n
                return tokens[start : start + k]
            end = at + len(suffix) - 1
    return []


@dataclass(frozen=True)
class Guesses:
    """One request's guesses for one step: the router's own tokens, or a number for the draft model."""

    tokens: list[int] = field(default_factory=list)
    #: Guesses the shards' draft model makes (SPECULATIVE_METHOD=draft).
    drafted: int = 0

    def __len__(self) -> int:
        return len(self.tokens) + self.drafted

    def cut(self, most: int) -> Guesses:
        """At most ``most`` of them (the KV slots the cache had for them)."""
        return Guesses(self.tokens[:most], min(self.drafted, most))


@dataclass
class SpeculationPolicy:
    """How many guesses each decoding request gets in a step."""

    #: SPECULATE: most guesses per request and step (0: off).
    most: int
    #: Most decode rows a step with guesses carries (SPECULATION_STEP_ROWS): the decoding
    #: requests' pending tokens and their guesses together.
    step_rows: int = 4
    #: SPECULATIVE_METHOD: "ngram" or "draft".
    method: str = "ngram"
    #: Steps sent ahead since the last one that waited to look for guesses.
    since_probe: int = 0

    def share(self, decoding: int) -> int:
        """Guesses each of ``decoding`` requests may make within the step's rows."""
        return max(0, min(self.most, (self.step_rows - decoding) // decoding)) if decoding else 0

    def guesses(self, r: Request, decoding: int, max_total_tokens: int) -> Guesses:
        share = self.share(decoding)
        if share <= 0 or r.pooling:
            return Guesses()
        # A step keeps at most its guesses plus one draw: never past the request's limits.
        room = min(r.max_new_tokens - len(r.generated), max_total_tokens - r.length) - 1
        k = min(r.speculation_width or share, share, room)
        if self.method == "draft":
            # A draft always has guesses, so a request whose last ones all failed guesses again
            # only on a probe step: otherwise every step would wait for its predecessor's answer.
            if r.spec_proposed and not r.speculation_hot and self.since_probe < PROBE_EVERY:
                return Guesses()
            return Guesses(drafted=max(0, k))
        found = ngram_guesses(r.token_ids, k)
        if not found:
            r.speculation_hot = False
        return Guesses(found)

    def wait_for_answer(self, decoding: list[Request]) -> bool:
        """Whether the next step should wait for the answer of the one in flight, to guess."""
        if self.share(len(decoding)) <= 0:
            return False
        return any(r.speculation_hot for r in decoding) or self.since_probe >= PROBE_EVERY

    def planned(self, ahead: bool) -> None:
        """A step was planned: ahead of its predecessor's answer, or after it (a chance to guess)."""
        self.since_probe = self.since_probe + 1 if ahead else 0

    def verified(self, r: Request, proposed: int, accepted: int) -> None:
        """Adapts the request's width: halved after a step whose guesses all failed, back up
        (doubled) after one that kept them all."""
        r.spec_proposed += proposed
        r.spec_accepted += accepted
        r.speculation_hot = accepted > 0
        width = r.speculation_width or self.most
        if accepted == 0:
            r.speculation_width = max(1, width // 2)
        elif accepted == proposed:
            r.speculation_width = min(self.most, width * 2)
