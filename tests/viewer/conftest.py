"""Helpers for the viewer tests: the real coco-inr architecture, narrowed so a CPU frame renders in a second."""

from __future__ import annotations

import socket

import pytest
from tiny_models import build, tiny_config

from cocoinr_nerfstudio.models.coco_inr import CocoInrModel


def build_tiny_model(**overrides) -> CocoInrModel:
    return build(tiny_config(**overrides))


@pytest.fixture
def make_tiny_model():
    """``make_tiny_model(**config_overrides)`` builds a tiny model (fresh, seeded)."""
    return build_tiny_model


@pytest.fixture
def tiny_model() -> CocoInrModel:
    return build_tiny_model()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return _free_port()
