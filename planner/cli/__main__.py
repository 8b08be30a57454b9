"""``python -m planner.cli ...``: the same as the ``memplan`` command."""

from planner.cli.main import main

main()
