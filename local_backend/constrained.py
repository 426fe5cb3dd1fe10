"""Constrained decoding with outlines: a JSON schema becomes a regex, the regex a token index
over the model's vocabulary, and each generated sequence walks the index with its own guide
that masks every token the schema does not allow next.

Indexes are cached per schema: building one takes milliseconds for a small schema and ~5 s
for the generic JSON object (three levels of nesting), so slow builds are also kept on disk
under the data dir. outlines_core releases the GIL while it builds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import torch
from outlines.backends.outlines_core import OutlinesCoreBackend
from outlines.models.transformers import TransformerTokenizer
from outlines_core import Guide, Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema
from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask

from local_backend.errors import InvalidSchema

# One optional space between JSON tokens: outlines' default allows any run of whitespace,
# and a small model can then emit newlines until max_tokens instead of closing the object.
JSON_WHITESPACE = r"[ ]?"
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)
_DISK_CACHE_MIN_BUILD_S = 0.5
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint: the token index every sequence's guide walks."""

    key: str
    index: Index


class TokenGuide:
    """One sequence's position in a grammar; masks logits and advances token by token."""

    def __init__(self, grammar: Grammar, vocab_size: int) -> None:
        self._guide = Guide(grammar.index)
        self._bitmask = allocate_token_bitmask(vocab_size)

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set every disallowed entry of the 1-D `logits` row to -inf, in place."""
        fill_next_token_bitmask(self._guide, self._bitmask)
        bits = (self._bitmask.unsqueeze(-1) >> _BIT_SHIFTS) & 1
        allowed = bits.bool().view(-1)[: logits.shape[-1]]
        logits.masked_fill_(~allowed, float("-inf"))

    def advance(self, token_id: int) -> None:
        self._guide.advance(token_id, return_tokens=False)

    def is_finished(self) -> bool:
        """True once the text is complete and only the end of sequence may follow."""
        return bool(self._guide.is_finished())


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer. Thread-safe."""

    def __init__(self, tokenizer: Any, cache_dir: Path | None = None, max_cached: int = 64) -> None:
        self._tokenizer = tokenizer
        self._disk = IndexDiskCache(cache_dir, tokenizer) if cache_dir is not None else None
        self._max_cached = max_cached
        self._vocabulary: Vocabulary | None = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def json_object(self) -> Grammar:
        return self.json_schema(ANY_JSON_OBJECT)

    def json_schema(self, schema: dict[str, Any]) -> Grammar:
        """The grammar of JSON documents valid against `schema`; InvalidSchema when the
        schema is malformed or uses a feature outlines cannot enforce."""
        check_schema(schema)
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        cached = self._cached(key)
        if cached is not None:
            return cached
        try:
            with self._build_lock(key):
                cached = self._cached(key)
                if cached is not None:
                    return cached
                grammar = Grammar(key, self._build_index(key))
                self._store(grammar)
                return grammar
        finally:
            with self._lock:
                self._building.pop(key, None)

    def _build_index(self, schema_json: str) -> Index:
        try:
            regex = build_regex_from_schema(schema_json, JSON_WHITESPACE)
        except (ValueError, TypeError) as exc:
            raise InvalidSchema(f"unsupported JSON schema: {exc}", param="response_format") from exc
        stored = self._disk.load(regex) if self._disk else None
        if stored is not None:
            return stored
        started = time.monotonic()
        try:
            index = Index(regex, self.vocabulary())
        except ValueError as exc:
            raise InvalidSchema(f"JSON schema cannot be enforced: {exc}", param="response_format") from exc
        if self._disk and time.monotonic() - started >= _DISK_CACHE_MIN_BUILD_S:
            self._disk.store(regex, index)
        return index

    def vocabulary(self) -> Vocabulary:
        with self._lock:
            if self._vocabulary is None:
                self._vocabulary = build_vocabulary(self._tokenizer)
            return self._vocabulary

    def _cached(self, key: str) -> Grammar | None:
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
            return grammar

    def _store(self, grammar: Grammar) -> None:
        with self._lock:
            self._cache[grammar.key] = grammar
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)

    def _build_lock(self, key: str) -> threading.Lock:
        # One build per schema at a time: concurrent requests for a new schema wait for it.
        with self._lock:
            return self._building.setdefault(key, threading.Lock())


def check_schema(schema: Any) -> None:
    """Raise InvalidSchema unless `schema` is a valid JSON Schema document."""
    if not isinstance(schema, dict):
        raise InvalidSchema("a JSON schema must be an object", param="response_format")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidSchema(f"invalid JSON schema: {exc.message}", param="response_format") from exc


def build_vocabulary(tokenizer: Any) -> Vocabulary:
    """outlines' vocabulary for `tokenizer`, without special tokens: they decode to nothing,
    so letting one into a JSON string would make the text and the guide disagree."""
    special = set(tokenizer.all_special_tokens)
    vocab = {token: token_id for token, token_id in tokenizer.get_vocab().items() if token not in special}
    vocab[tokenizer.eos_token] = tokenizer.eos_token_id
    to_string = TransformerTokenizer(tokenizer).convert_token_to_string
    return OutlinesCoreBackend.create_outlines_core_vocabulary(
        vocab, tokenizer.eos_token_id, tokenizer.eos_token, to_string
    )


class IndexDiskCache:
    """Slow-to-build indexes pickled under the data dir, keyed by vocabulary and regex."""

    def __init__(self, folder: Path, tokenizer: Any) -> None:
        self._folder = folder
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        seed = f"{version('outlines_core')}|{tokenizer.eos_token_id}|{vocab}"
        self._vocab_key = hashlib.sha256(seed.encode()).hexdigest()

    def load(self, regex: str) -> Index | None:
        path = self._path(regex)
        if not path.is_file():
            return None
        try:
            with path.open("rb") as f:
                index: Index = pickle.load(f)  # our own file, written by `store`
            return index
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            logger.warning("ignoring unreadable grammar cache %s: %s", path, exc)
            return None

    def store(self, regex: str, index: Index) -> None:
        path = self._path(regex)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, staging = tempfile.mkstemp(dir=path.parent, prefix=".index-")
            with os.fdopen(fd, "wb") as f:
                pickle.dump(index, f)
            os.replace(staging, path)
        except OSError as exc:
            logger.warning("cannot cache grammar in %s: %s", path.parent, exc)

    def _path(self, regex: str) -> Path:
        key = hashlib.sha256(f"{self._vocab_key}|{regex}".encode()).hexdigest()[:40]
        return self._folder / f"index-{key}.pkl"
