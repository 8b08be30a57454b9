"""The readings merged: every file's settings as one, with the trainer they are for.

What `planner.explain.from_files` builds (`merge`) and `planner.explain.rules` reads; it lives
below both, beside the readers whose `Reading` it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from planner.explain.keys import AUTO
from planner.explain.readers import Problem, Reading, Setting


@dataclass
class Merged:
    """Every file's settings merged, with the trainer they are for."""

    readings: list[Reading]
    trainer: str
    settings: dict[str, Setting]
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def deepspeed(self) -> bool:
        """Whether the run goes through DeepSpeed (a DeepSpeed file was read)."""
        return any(r.kind == "deepspeed" for r in self.readings) or "zero_stage" in self.settings

    def value(self, name: str, default: Any = None) -> Any:
        got = self.settings.get(name)
        return default if got is None or got.value == AUTO else got.value
