"""What is wrong with the farm, as status collects it: each problem a level and a sentence."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from farmkeys.status.document import HEALTH_ORDER, Health

Level = Literal["warning", "critical"]


@dataclass
class Problems:
    """The problems one status read found, in the order it found them."""

    items: list[tuple[Level, str]] = field(default_factory=list)

    def add(self, level: Level, text: str) -> None:
        self.items.append((level, text))

    @property
    def health(self) -> Health:
        """The worst level found; ``ok`` when there is none."""
        return max((lvl for lvl, _ in self.items), key=HEALTH_ORDER.index, default="ok")

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(text for _, text in self.items)


def human(delta: timedelta) -> str:
    """A duration as a problem says it: in days, hours, minutes or seconds."""
    seconds = int(delta.total_seconds())
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} hours"
    if seconds >= 120:
        return f"{seconds // 60} minutes"
    return f"{seconds} seconds"
