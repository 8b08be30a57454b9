"""The user's cache: where it lives, unambiguous keys, atomic writes, and no stale or corrupt entry
ever trusted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from planner.profile import cache


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "own"
    monkeypatch.delenv("MEMPLAN_CACHE_DIR")
    assert cache.cache_dir() == tmp_path / "xdg" / "memplan"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec: a relative path is ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "memplan"


def test_cache_key_is_unambiguous():
    assert cache.cache_key("ab", "c") != cache.cache_key("a", "bc")
    assert cache.cache_key("a", "") != cache.cache_key("a")
    assert cache.cache_key("x", "y") == cache.cache_key("x", "y")
    assert len(cache.cache_key("x")) == 64 and int(cache.cache_key("x"), 16) >= 0


def test_round_trip_and_atomic_write(tmp_path):
    key = cache.cache_key("model")
    assert cache.read_entry("inventory", key, 1) is None
    cache.write_entry("inventory", key, 1, {"groups": [1, 2]})
    assert cache.read_entry("inventory", key, 1) == {"groups": [1, 2]}
    cache.write_entry("inventory", key, 1, {"groups": [3]})  # replaced whole
    assert cache.read_entry("inventory", key, 1) == {"groups": [3]}
    folder = cache.cache_dir() / "inventory"
    assert sorted(p.name for p in folder.iterdir()) == [f"{key}.json"]  # no temporary file left


def _entry_path(key: str) -> Path:
    return cache.cache_dir() / "inventory" / f"{key}.json"


@pytest.mark.parametrize("spoil", ["version", "kind", "key", "checksum", "truncated", "not json", "nan", "array",
                                   "symlink", "folder"])
def test_stale_or_corrupt_entries_read_as_missing(spoil: str, tmp_path):
    key = cache.cache_key("m")
    cache.write_entry("inventory", key, 1, {"n": 1})
    path = _entry_path(key)
    doc = json.loads(path.read_text())
    if spoil == "version":
        assert cache.read_entry("inventory", key, 2) is None
        return
    if spoil == "kind":
        doc["kind"] = "fitted"
    elif spoil == "key":
        doc["key"] = cache.cache_key("other")
    elif spoil == "checksum":
        doc["data"]["n"] = 2  # edited by hand: the checksum no longer matches
    if spoil in ("kind", "key", "checksum"):
        path.write_text(json.dumps(doc))
    elif spoil == "truncated":
        path.write_text(path.read_text()[:-5])
    elif spoil == "not json":
        path.write_bytes(b"\xff\xfe garbage")
    elif spoil == "nan":
        path.write_text(path.read_text().replace('"n":1', '"n":NaN'))
    elif spoil == "array":
        path.write_text("[1, 2]")
    elif spoil == "symlink":
        target = tmp_path / "elsewhere.json"
        target.write_text(path.read_text())
        path.unlink()
        path.symlink_to(target)
    elif spoil == "folder":
        path.unlink()
        path.mkdir()
    assert cache.read_entry("inventory", key, 1) is None


def test_an_entry_over_the_bound_is_not_read(monkeypatch):
    key = cache.cache_key("big")
    cache.write_entry("inventory", key, 1, {"blob": "x" * 2000})
    monkeypatch.setattr(cache, "MAX_ENTRY_BYTES", 1000)
    assert cache.read_entry("inventory", key, 1) is None


def test_an_unwritable_cache_just_does_not_cache(monkeypatch, tmp_path):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(blocker / "sub"))  # a file where a folder should be
    cache.write_entry("inventory", cache.cache_key("m"), 1, {"n": 1})  # no exception
    assert cache.read_entry("inventory", cache.cache_key("m"), 1) is None
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(ro))
        cache.write_entry("inventory", cache.cache_key("m"), 1, {"n": 1})
        assert list(ro.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 200])
def test_kind_and_key_are_plain_names(name: str):
    with pytest.raises(ValueError, match="not a plain name"):
        cache.read_entry(name, "k", 1)
    with pytest.raises(ValueError, match="not a plain name"):
        cache.write_entry("inventory", name, 1, {})


def test_no_home_folder_means_no_cache(monkeypatch):
    def no_home() -> None:
        raise RuntimeError("Could not determine home directory.")

    for name in ("MEMPLAN_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    cache.write_entry("inventory", cache.cache_key("m"), 1, {"n": 1})  # no exception
    assert cache.read_entry("inventory", cache.cache_key("m"), 1) is None
