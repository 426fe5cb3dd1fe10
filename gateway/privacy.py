"""Privacy deletion that reaches what was derived from the deleted records.

`DELETE /admin/logs` removes records; copies of their prompts also live in the adapters' data
splits (`adapters/ROUTE/vN/{train,heldout,validation}.jsonl`, staging folders included), in
eval verdicts, in the gateway's own judge/shadow calls about them, and in training jobs'
files (`jobs/*.failed.jsonl`, logs, status). `forget` removes those too.

What is matched: the text of every user message (each text part and the parts joined) and
the `prompt`/`input` strings of the deleted requests. A JSON line goes when any string in it,
or in JSON text nested in it (an eval's `prompt`), equals one of those texts; a plain-text
line (a job log) or a judge/shadow call of the gateway's own goes when it contains one of at
least `MIN_LOG_MATCH_CHARS` characters.
Over-deletion is the safe side: a pair whose prompt was also asked later goes as well.

Adapters trained on a removed pair are marked `"trained_on_deleted": true` in meta.json; the
caller may retrain the route on what is left. The deletion itself is logged with counts only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.store.base import Store

log = logging.getLogger("understudy.privacy")

# Shorter texts ("hi", "thanks") are not searched for inside free text: they identify no one
# and would take every log line with them. In JSON they still match exactly.
MIN_LOG_MATCH_CHARS = 8
# The splits whose pairs an adapter was trained on (heldout is only judged on).
TRAINED_ON = frozenset({"train.jsonl", "validation.jsonl"})
_OWN_CALL_KINDS = ("judge", "shadow")
_EVAL_PAGE = 500


@dataclass
class Forget:
    """The texts of deleted requests and the routes they were on."""

    texts: set[str] = field(default_factory=set)
    routes: set[str] = field(default_factory=set)

    def add_request(self, request: Any) -> None:
        if not isinstance(request, dict):
            return
        for message in request.get("messages") or ():
            if isinstance(message, dict) and message.get("role") == "user":
                self._add_content(message.get("content"))
        for key in ("prompt", "input"):
            self._add_content(request.get(key))

    def _add_content(self, content: Any) -> None:
        if isinstance(content, str):
            self._add(content)
        elif isinstance(content, list):
            parts = [p.get("text") if isinstance(p, dict) else p for p in content]
            texts = [p for p in parts if isinstance(p, str)]
            for text in texts:
                self._add(text)
            if len(texts) > 1:
                self._add("\n".join(texts))

    def _add(self, text: str) -> None:
        if text.strip():
            self.texts.add(text)

    def matches_json(self, value: Any) -> bool:
        """Whether any string in `value` (or in JSON text inside it) is a forgotten text."""
        return any(text in self.texts for text in _strings(value))

    def matches_text(self, line: str) -> bool:
        return any(form in line for form in self._log_forms())

    def _log_forms(self) -> Iterator[str]:
        for text in self.texts:
            if len(text) >= MIN_LOG_MATCH_CHARS:
                yield text
                yield json.dumps(text)[1:-1]
                yield json.dumps(text, ensure_ascii=False)[1:-1]
                yield json.dumps(json.dumps(text)[1:-1])[1:-1]  # JSON text inside JSON


def _strings(value: Any, depth: int = 0) -> Iterator[str]:
    if depth > 64:
        return
    if isinstance(value, str):
        yield value
        if value[:1] in ("[", "{", '"'):
            yield from _strings(_json_or_none(value), depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, depth + 1)


@dataclass
class ForgetReport:
    """What a deletion removed (counts only: it never echoes the deleted content)."""

    records: int = 0
    own_calls: int = 0
    evals: int = 0
    adapter_lines: Counter[str] = field(default_factory=Counter)
    job_lines: int = 0
    adapters_trained_on_deleted: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "own_calls": self.own_calls,
            "evals": self.evals,
            "adapter_lines": dict(self.adapter_lines),
            "job_lines": self.job_lines,
            "adapters_trained_on_deleted": self.adapters_trained_on_deleted,
        }


def _ts(row: dict[str, Any]) -> float:
    ts = row["ts"]
    return float(ts) if isinstance(ts, int | float) else datetime.fromisoformat(ts).timestamp()


def collect(store: Store, route: str | None, before: float | None) -> Forget:
    """The texts of the records `delete_records(route, before)` is about to delete."""
    forget = Forget()
    for row in store.iter_records(route=route, kind=None):
        if before is not None and _ts(row) >= before:
            continue
        forget.routes.add(row["route"])
        forget.add_request(row.get("request"))
    return forget


def forget(
    store: Store, data_dir: Path, route: str | None, before: float | None, adapters_dir: Path | None = None
) -> ForgetReport:
    """Delete the matching records and every copy of their prompts under `data_dir` and in
    the store. Blocking: run it in a worker thread."""
    found = collect(store, route, before)
    report = ForgetReport(records=store.delete_records(route, before))
    if found.texts:
        report.own_calls = _forget_own_calls(store, found)
        report.evals = _forget_evals(store, found)
        _forget_adapter_data(adapters_dir or data_dir / "adapters", found, report)
        report.job_lines = _forget_job_files(data_dir / "jobs", found)
    log.info(
        "privacy deletion (route=%s, before=%s unix s): %s",
        route or "*",
        "-" if before is None else f"{before:.3f}",
        json.dumps(report.as_dict()),
    )
    return report


def _forget_own_calls(store: Store, found: Forget) -> int:
    ids = [
        row["id"]
        for route in sorted(found.routes)
        for kind in _OWN_CALL_KINDS
        for row in store.iter_records(route=route, kind=kind)
        # The gateway's own prompts quote the client's inside their own text.
        if found.matches_text(json.dumps(row.get("request")))
    ]
    return store.delete_record_ids(ids)


def _forget_evals(store: Store, found: Forget) -> int:
    ids: list[int] = []
    for route in sorted(found.routes):
        before_id: int | None = None
        while page := store.list_evals(route, _EVAL_PAGE, before_id):
            ids += [row["id"] for row in page if found.matches_json(row.get("prompt"))]
            before_id = page[-1]["id"]
    return store.delete_eval_ids(ids)


def _forget_adapter_data(root: Path, found: Forget, report: ForgetReport) -> None:
    for route in sorted(found.routes):
        route_dir = root / route
        if not route_dir.is_dir() or route_dir.parent != root:
            continue
        for path in sorted(route_dir.rglob("*.jsonl")):
            removed = _rewrite_lines(path, lambda line: found.matches_json(_json_or_none(line)))
            report.adapter_lines[path.name] += removed
            if removed and path.name in TRAINED_ON:
                _mark_trained_on_deleted(path.parent, route, report)


def _mark_trained_on_deleted(folder: Path, route: str, report: ForgetReport) -> None:
    meta_path = folder / "meta.json"
    entry = {"route": route, "version": folder.name}
    if entry in report.adapters_trained_on_deleted:
        return
    report.adapters_trained_on_deleted.append(entry)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return  # a staging folder: its job writes meta.json later (see the report)
    meta["trained_on_deleted"] = True
    _write_atomic(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def _forget_job_files(jobs_dir: Path, found: Forget) -> int:
    if not jobs_dir.is_dir():
        return 0
    removed = 0
    for path in sorted(jobs_dir.iterdir()):
        if path.suffix == ".jsonl":
            removed += _rewrite_lines(path, lambda line: found.matches_json(_json_or_none(line)))
        elif path.suffix == ".log":
            removed += _rewrite_lines(path, found.matches_text)
        elif path.suffix == ".json" and path.is_file():
            removed += _redact_json(path, found)
    return removed


def _redact_json(path: Path, found: Forget) -> int:
    """A job status file: a message quoting a deleted prompt (a log tail) is blanked."""
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if not isinstance(status, dict):
        return 0
    hits = [key for key, value in status.items() if isinstance(value, str) and found.matches_text(value)]
    for key in hits:
        status[key] = "[removed by a privacy deletion]"
    if hits:
        _write_atomic(path, json.dumps(status, indent=2) + "\n")
    return len(hits)


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _rewrite_lines(path: Path, drop: Callable[[str], bool]) -> int:
    """Rewrite `path` without the lines `drop` selects (atomically); how many went."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    except OSError:
        return 0
    kept = [line for line in lines if not (line.strip() and drop(line))]
    if len(kept) != len(lines):
        _write_atomic(path, "".join(kept))
    return len(lines) - len(kept)


def _write_atomic(path: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def routes_to_retrain(report: ForgetReport) -> Iterable[str]:
    return sorted({entry["route"] for entry in report.adapters_trained_on_deleted})
