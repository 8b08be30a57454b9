"""The ``memplan`` command line: parse, build objects, call one library function, render.

The edge of the flow: one module per command (estimate, tune, explain, launch and train,
trace, profiles), rendering (render, render_explain), what they share (common), and the group
with its error boundary and lazy registry (main). User errors become one-line messages with exit
code 2; heavy imports (torch, transformers) happen only in the commands that need them.
"""

from planner.cli.main import main

__all__ = ["main"]
