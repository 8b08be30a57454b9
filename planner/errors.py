"""The one user-input error every stage raises; the CLI turns it into one line and exit code 2.

Below every stage of the flow: anything may import it, it imports nothing of memplan's.
"""

from __future__ import annotations


class ProfileError(ValueError):
    """Bad input from the user: a malformed profile or config, an unknown name, an option out of
    bounds, a contradiction between options, an unreadable file. The message is one line, fit to
    show as it is."""


UserInputError = ProfileError
"""The same class under the name that says what it is for."""
