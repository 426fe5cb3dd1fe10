"""Fixtures shared by the adaptive cycle's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.demo import task
from gateway.demo.fakecloud import FakeCloud, FakeCloudServer


@pytest.fixture
def extraction_cloud() -> Iterator[FakeCloudServer]:
    """The simulated cloud of the demo's task: it answers the extraction exactly and, asked
    for new user messages like some examples, writes task sentences (synthetic data)."""
    server = FakeCloudServer(FakeCloud(answer=task.cloud_answer)).start()
    yield server
    server.stop()
