"""Shared fixtures: the shipped catalog, quiet transformers, and an empty memplan cache per test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def catalog():
    from planner.profile.catalog import load_catalog

    return load_catalog()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Each test its own empty memplan cache (``$MEMPLAN_CACHE_DIR``, outside the test's folder):
    an inventory cached by an earlier test would hide a build, and tests never write ~/.cache."""
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path_factory.mktemp("memplan-cache")))
    # ... and its own empty config folder: a developer's ~/.config/memplan calibration profile
    # would change the runtime constants the tests check.
    monkeypatch.setenv("MEMPLAN_CONFIG_DIR", str(tmp_path_factory.mktemp("memplan-config")))


@pytest.fixture(autouse=True)
def _no_fitted_terms():
    """Each test starts with no fitted activation terms in the process (planner.estimate.generic)."""
    from planner.estimate import generic

    generic.forget_all()
    yield
    generic.forget_all()
