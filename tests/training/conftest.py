"""Fixtures of the trainer tests: one tiny prepared dataset per session, tiny run configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import prepare_tiny_dataset

from kha_train.training import distributed as D


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """Every test leaves no process group behind (the trainer creates one per run)."""
    yield
    D.teardown()
