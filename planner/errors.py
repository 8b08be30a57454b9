"""The one user-input error every stage raises; the CLI turns it into one line and exit code 2.

Below every stage of the flow: anything may import it, it imports nothing of memplan's.
"""

from __future__ import annotations


class ProfileError(ValueError):
    """Bad input from the user: a malformed profile or config, an unknown name, an option out of
    bounds, a contradiction between options, an unreadable file. The message is one line, fit to
    show as it is."""


EXTRA_HINT = "pip install 'memplan[train]'"
"""How to get what tracing, local configs and the built-in trainer need (pyproject's ``train``
extra: torch, transformers, deepspeed, peft)."""


def require_extra(what: str, *modules: str) -> None:
    """Import ``modules`` (what ``what`` needs beyond the planning core), or refuse in one line.

    Raises:
        ProfileError: one of them is not installed (or fails to import), with the install hint.
    """
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ProfileError(f"{what} needs {name}, which is not installed here ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else name}); {EXTRA_HINT}") from None
