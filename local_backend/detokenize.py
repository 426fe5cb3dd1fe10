"""Turning generated token ids into text one token at a time, and cutting at stop strings."""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded along with the first generated ones, so a tokenizer that drops a
# word's leading space at the start of a decode (SentencePiece) spaces the first word right.
_CONTEXT_TOKENS = 4
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids (the TGI/vLLM prefix-offset method): a
    delta is released only once it no longer ends in a partial UTF-8 character."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", sometimes several chars)."""
        self._ids.append(token_id)
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._ids))
        if len(text) <= len(prefix) or text.endswith(_INCOMPLETE):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""

    def _decode(self, start: int, end: int) -> str:
        return str(self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True))


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string never
    reaches the client even when it arrives split over several tokens."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        self._pending += text
        hit = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if hit >= 0:
            emit, self._pending = self._pending[:hit], ""
            return emit, True
        keep = self._partial_stop_length()
        cut = len(self._pending) - keep
        emit, self._pending = self._pending[:cut], self._pending[cut:]
        return emit, False

    def flush(self) -> str:
        emit, self._pending = self._pending, ""
        return emit

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        pending = self._pending
        for length in range(min(len(pending), max(len(s) for s in self._stops) - 1), 0, -1):
            tail = pending[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
