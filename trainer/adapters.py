"""Versioned LoRA adapters on disk: `ADAPTERS_DIR/ROUTE/vN/` (peft folder + meta.json + the
data splits it was trained and is to be judged on); ADAPTERS_DIR defaults to DATA_DIR/adapters
and may be a volume that several gateways, their trainers and the local backend share.

A version appears atomically: the job trains into a staging folder next to the versions and
renames it onto a freshly claimed, empty `vN` at the end. A folder counts as a version only
once its meta.json is there, so a crash at any point never yields a half adapter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import TrainerError
from trainer.names import validate_job_id, validate_route
from trainer.progress import utc_now, write_json_atomic

META_FILE = "meta.json"
HELDOUT_FILE = "heldout.jsonl"
TRAIN_FILE = "train.jsonl"
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
_STAGING_PREFIX = ".staging-"


class AdapterNotFound(TrainerError, KeyError):
    """No such adapter version for the route."""


@dataclass(frozen=True)
class AdapterVersion:
    route: str
    version: int
    path: Path
    meta: dict[str, Any]

    @property
    def heldout_path(self) -> Path:
        return self.path / HELDOUT_FILE


class AdapterRegistry:
    """The adapter versions of every route under `root` (default `DATA_DIR/adapters`)."""

    def __init__(self, data_dir: Path, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else Path(data_dir) / "adapters"

    def route_dir(self, route: str) -> Path:
        return self.root / validate_route(route)

    def versions(self, route: str) -> list[AdapterVersion]:
        """Complete versions of `route`, oldest first."""
        found = [self._read(route, number) for number in self._numbers(route)]
        return [version for version in found if version is not None]

    def get(self, route: str, version: int) -> AdapterVersion:
        found = self._read(route, version)
        if found is None:
            raise AdapterNotFound(f"route {route!r} has no adapter v{version}")
        return found

    def path(self, route: str, version: int) -> Path:
        return self.get(route, version).path

    def latest(self, route: str) -> AdapterVersion | None:
        versions = self.versions(route)
        return versions[-1] if versions else None

    def update_meta(self, route: str, version: int, updates: dict[str, Any]) -> dict[str, Any]:
        """Merge `updates` into a version's meta.json (e.g. eval scores) and return it."""
        found = self.get(route, version)
        meta = {**found.meta, **updates}
        write_json_atomic(found.path / META_FILE, meta)
        return meta

    @contextmanager
    def staging(self, route: str, job_id: str) -> Iterator[Path]:
        """A fresh folder to train into; removed on exit unless `commit` moved it."""
        folder = self.staging_dir(route, job_id)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def staging_dir(self, route: str, job_id: str) -> Path:
        return self.route_dir(route) / f"{_STAGING_PREFIX}{validate_job_id(job_id)}"

    def discard_staging(self, route: str, job_id: str) -> None:
        """Remove what a killed job left behind."""
        shutil.rmtree(self.staging_dir(route, job_id), ignore_errors=True)

    def commit(self, route: str, staging: Path, meta: dict[str, Any]) -> AdapterVersion:
        """Publish a finished staging folder as the next version, with `meta` (plus version
        and created_at) as its meta.json."""
        version, target = self._claim_next(route)
        full_meta = {**meta, "route": route, "version": version, "created_at": utc_now()}
        write_json_atomic(staging / META_FILE, full_meta)
        # POSIX rename replaces an empty directory atomically: the claim becomes the version.
        os.replace(staging, target)
        return AdapterVersion(route, version, target, full_meta)

    def _claim_next(self, route: str) -> tuple[int, Path]:
        while True:
            version = max(self._numbers(route), default=0) + 1
            target = self.route_dir(route) / f"v{version}"
            try:
                target.mkdir(parents=True)
            except FileExistsError:
                continue
            return version, target

    def _numbers(self, route: str) -> list[int]:
        folder = self.route_dir(route)
        if not folder.is_dir():
            return []
        matches = (_VERSION_DIR.match(entry.name) for entry in folder.iterdir())
        return sorted(int(match.group(1)) for match in matches if match)

    def _read(self, route: str, version: int) -> AdapterVersion | None:
        path = self.route_dir(route) / f"v{version}"
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return AdapterVersion(route, version, path, meta)
