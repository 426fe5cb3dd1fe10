"""The running batch's KV cache and attention mask, kept aligned as rows leave and join.

Rows are left-padded: column j of the mask is 1 where row i has a real token at cache
slot j. Rows leave (`keep`), join (`absorb`, padding the shorter side on the left), and
columns that no remaining row uses are dropped from the left (`trim`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass
class BatchCache:
    cache: DynamicCache
    mask: torch.Tensor  # [rows, cache length], long
    positions: torch.Tensor  # [rows], position id of each row's last token

    @property
    def joinable(self) -> bool:
        """Whether rows can be merged in: only plain (non-sliding, unquantized) layers."""
        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]

    def absorb(self, other: BatchCache) -> None:
        """Append `other`'s rows after ours."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self._pad_left(width)
        other._pad_left(width)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)
        self.positions = torch.cat([self.positions, other.positions], dim=0)

    def trim(self) -> None:
        """Drop leading columns that are padding for every row (their owners have left)."""
        if not self.joinable:
            return
        used = self.mask.any(dim=0)
        first = int(used.int().argmax()) if bool(used.any()) else 0
        if first == 0:
            return
        for layer in _layers(self.cache):
            layer.keys = layer.keys[..., first:, :]
            layer.values = layer.values[..., first:, :]
        self.mask = self.mask[:, first:]

    def extend(self) -> None:
        """One more column for the token each row is about to feed."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        self.positions = self.positions + 1

    def _pad_left(self, width: int) -> None:
        missing = width - self.mask.shape[1]
        if missing <= 0:
            return
        for layer in _layers(self.cache):
            layer.keys = _pad_seq_left(layer.keys, missing)
            layer.values = _pad_seq_left(layer.values, missing)
        self.mask = torch.cat([self.mask.new_zeros((self.mask.shape[0], missing)), self.mask], dim=1)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers; callers check `joinable` first, so each holds `keys` and `values`."""
    return list(cache.layers)


def _pad_seq_left(states: torch.Tensor, count: int) -> torch.Tensor:
    """[batch, heads, seq, dim] with `count` zero slots prepended along seq."""
    shape = (*states.shape[:2], count, states.shape[-1])
    return torch.cat([states.new_zeros(shape), states], dim=2)
