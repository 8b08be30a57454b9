"""A model by what the user calls it: a profile name or hub id from the catalog, or a local
config.json (or its folder). Part of the profile stage; every command loads models through it.
"""

from __future__ import annotations

from pathlib import Path

from planner.errors import ProfileError
from planner.profile.catalog import Catalog, ModelSpec, build_model


def load_model(name: str, catalog: Catalog, flag: str = "--model", trust_remote_code: bool = False) -> ModelSpec:
    """A ModelSpec from a profile name or hub id, or from a local config.json / folder (read from
    the cache, or built with torch and transformers, the ``train`` extra).

    Args:
        name: what the user calls the model.
        catalog: the profiles.
        flag: the option it came from, for messages.
        trust_remote_code: a local model that ships its own code may run it (``--trust-remote-code``).

    Raises:
        ProfileError: no such profile (with close matches), a folder without config.json, or a
            config.json transformers cannot build (`hf_config.model_from_config`).
    """
    from planner.profile.hf_config import find_config, model_from_config

    if catalog.has_model(name):
        return build_model(catalog.model(name))
    if find_config(name) is not None:
        return model_from_config(name, trust_remote_code=trust_remote_code)
    if Path(name).expanduser().exists():
        raise ProfileError(f"{flag} {name}: no config.json there")
    if _looks_like_path(name):
        raise ProfileError(f"{flag} {name}: no such file or folder (a profile name, hub id or local config.json)")
    return build_model(catalog.model(name))  # raises with close matches


def _looks_like_path(name: str) -> bool:
    """A name only a path can be (a hub id is ``org/name``; a profile has no slash)."""
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".json") or name.count("/") > 1
