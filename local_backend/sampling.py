"""Per-sequence sampling parameters and the token choice for one row of logits."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the decoder; shared by every sequence of the request."""

    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        """Whether choosing a token depends on the tokens generated so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class TokenSampler:
    """Chooses the next token of one sequence: penalties, bias, temperature, top-p, seed."""

    def __init__(self, params: SamplingParams, seed: int | None) -> None:
        self.params = params
        self._generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        self._counts: torch.Tensor | None = None

    def adjust(self, logits: torch.Tensor) -> None:
        """Apply logit bias and presence/frequency penalties to a 1-D row, in place."""
        for token_id, bias in self.params.logit_bias.items():
            if 0 <= token_id < logits.shape[-1]:
                logits[token_id] += bias
        if self._counts is not None:
            logits -= self._counts * self.params.frequency_penalty
            logits -= (self._counts > 0).to(logits.dtype) * self.params.presence_penalty

    def choose(self, logits: torch.Tensor) -> int:
        """Pick a token id from an adjusted (and possibly masked) 1-D row."""
        if self.params.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            probs = _top_p_filter(probs, self.params.top_p)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def observe(self, token_id: int, vocab_size: int) -> None:
        if not self.params.needs_history:
            return
        if self._counts is None:
            self._counts = torch.zeros(vocab_size)
        self._counts[token_id] += 1


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p`."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
