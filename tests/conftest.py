"""Shared fixtures: the shipped catalog, and quiet transformers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def catalog():
    from planner.profile.catalog import load_catalog

    return load_catalog()
