"""Real services for the tests: the Pub/Sub emulator, a GCS emulator and PostgreSQL.

They start once per test session on free ports; each test gets its own topic,
subscription, dead-letter topic and tenant (gannet.dev.stack), so tests cannot see each
other's messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gannet.dev.local_services import LocalServices
from gannet.dev.stack import (
    SAMPLES,
    Stack,
    gannet,
    make_stack,
    prepared_services,
    settled,
)

__all__ = ["MANIFEST", "SAMPLES", "SCENES", "gannet", "make_stack", "prepared_services", "settled"]

os.environ.setdefault("YOLO_OFFLINE", "1")
MANIFEST = json.loads((SAMPLES / "manifest.json").read_text())
SCENES = [e for e in MANIFEST["images"] if e.get("kind", "scene") != "large"]


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    with prepared_services(tmp_path_factory.mktemp("services")) as running:
        yield running


@pytest.fixture
def stack(services: LocalServices, tmp_path: Path) -> Iterator[Stack]:
    made = make_stack(services, tmp_path)
    yield made
    for daemon in made.daemons:
        if daemon.proc.poll() is None:
            daemon.stop(timeout_s=30)


def expected_counts(entry: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in entry["counts"].items() if v}
