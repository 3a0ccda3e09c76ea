"""Incremental detokenization and stop strings: turn one token at a time into text deltas that are safe to send.

A token is not a piece of text: byte-level BPE splits a multi-byte character over several tokens, and SentencePiece
decodes a word's leading space differently at the start of a string. So we decode a short window of ids twice, with
and without the newest ones, and emit the difference only once it no longer ends in an incomplete character (U+FFFD),
the method of vLLM and TGI. Stop strings are checked on the text; the tail that could still grow into a stop string
is held back, so the deltas always concatenate to the final text.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens decoded before the first output token, so that its leading space comes out right


class IncrementalDetokenizer:
    """Text deltas from a growing list of token ids."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix = 0  # ids[prefix:read] decode to text already emitted (kept as context)
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; return the new complete text (may be empty while a character is incomplete)."""
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes to U+FFFD); call once at the end."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return new_text[len(prefix_text) :]


class TextStream:
    """Detokenizer plus stop strings: ``push`` returns ``(delta, stopped)``; ``finish`` returns the last delta."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self.stop = stop
        self.text = ""  # everything decoded so far (cut before a stop string once one appears)
        self.sent = 0  # how much of ``text`` has been returned

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.detok is None:
            return "", False
        return self._add(self.detok.push(token_id))

    def finish(self) -> str:
        """Flush everything held back (at the end of generation)."""
        delta = ""
        if self.detok is not None:
            delta, stopped = self._add(self.detok.flush())
            if stopped:
                return delta
        delta += self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def _add(self, new: str) -> tuple[str, bool]:
        if not new:
            return "", False
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self._held_back()), False

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the beginning of a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit(self, upto: int) -> str:
        delta = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return delta
