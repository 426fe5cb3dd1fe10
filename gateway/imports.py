"""Seeding a route from a dataset a team already has, in OpenAI's fine-tuning JSONL.

Every line is validated (`{"messages": [...]}`, optional `tools`, a trainable assistant turn)
and every bad line is reported with its number; a file with any bad line imports nothing.
A good file lands atomically as DATA_DIR/imports/ROUTE/ID.jsonl with ID.json beside it, where
the trainer reads it (trainer.dataset.load_imports) next to the route's logged pairs. With
`heldout: false` its pairs are only trained on, never used by the judge.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.dataset import IMPORTS_DIR, SkipSample, import_files, normalize_sample

# Reported per bad line, at most this many (the count says how many there were in all).
MAX_REPORTED_ERRORS = 100
_REASONS = {
    "malformed": 'not a {"messages": [...]} chat with valid roles and contents',
    "empty_answer": "no assistant turn with an answer to train on",
}


@dataclass
class Validation:
    chats: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0


def validate_lines(lines: list[bytes]) -> Validation:
    """Each non-blank line parsed and checked; errors carry their 1-based line number."""
    result = Validation()
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            chat = json.loads(raw)
            normalize_sample(chat)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            _bad(result, number, f"not JSON: {exc}")
        except SkipSample as exc:
            _bad(result, number, _REASONS.get(exc.reason, exc.reason))
        else:
            result.chats.append(chat)
    return result


def _bad(result: Validation, number: int, message: str) -> None:
    result.bad_lines += 1
    if len(result.errors) < MAX_REPORTED_ERRORS:
        result.errors.append({"line": number, "error": message})


class Imports:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir

    def folder(self, route: str) -> Path:
        return self.data_dir / IMPORTS_DIR / route

    def save(self, route: str, chats: list[dict[str, Any]], name: str, heldout: bool) -> dict[str, Any]:
        """Write the import atomically (temp file, then rename), its meta first: the trainer
        finds imports by their .jsonl, so it never sees pairs without their meta."""
        folder = self.folder(route)
        folder.mkdir(parents=True, exist_ok=True)
        import_id = f"imp_{time.strftime('%Y%m%dT%H%M%S')}_{secrets.token_hex(3)}"
        meta = {
            "id": import_id,
            "route": route,
            "name": name,
            "pairs": len(chats),
            "heldout": heldout,
            "created_at": time.time(),
        }
        data, info = folder / f"{import_id}.jsonl", folder / f"{import_id}.json"
        _write_atomic(info, json.dumps(meta).encode())
        _write_atomic(data, b"".join(json.dumps(chat, ensure_ascii=False).encode() + b"\n" for chat in chats))
        return meta

    def list(self, route: str) -> list[dict[str, Any]]:
        return [
            json.loads(path.with_suffix(".json").read_text()) for path in import_files(self.data_dir, route)
        ]

    def delete(self, route: str, import_id: str) -> bool:
        folder = self.folder(route)
        data = folder / f"{import_id}.jsonl"
        if not import_id.startswith("imp_") or data.parent != folder or not data.is_file():
            return False
        data.unlink()
        (folder / f"{import_id}.json").unlink(missing_ok=True)
        return True

    def pairs_since(self, route: str, since: float) -> int:
        """Imported pairs that arrived after `since` (a Unix time): new data for training."""
        return sum(meta["pairs"] for meta in self.list(route) if meta.get("created_at", 0) > since)


def _write_atomic(path: Path, payload: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(payload)
    os.replace(temp, path)
