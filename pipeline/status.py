"""What became of an image in a run: the one set of outcome names the stages, the
summary and the ``images`` table's ``status`` column use (a ``StrEnum``: each member is
its text, so it is written to Arrow, JSON and the tables as is)."""
from __future__ import annotations

import enum

if hasattr(enum, "StrEnum"):
    StrEnum = enum.StrEnum
else:  # Python 3.10: the same behaviour (each member is its text, also in str() and f-strings)
    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


class Status(StrEnum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"  # no mask good enough to extract: a final outcome, like ok
    RESUMED = "resumed"  # done by an earlier run (the tables or a record say so)
    DUPLICATE = "duplicate"  # the same content as an earlier row of this run: processed once
    SCORED = "scored"  # a score-only run's outcome: masks scored and selected, not extracted


__all__ = ["Status"]
