"""Fixtures of the model tests: the tiny configs and builders of ``model_helpers``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from model_helpers import build, make_cfg

from kha_train.config import ModelConfig
from kha_train.model import Transformer


@pytest.fixture
def tiny_cfg() -> Callable[..., ModelConfig]:
    return make_cfg


@pytest.fixture
def build_model() -> Callable[..., Transformer]:
    return build
