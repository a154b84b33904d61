"""What a job function returns to the runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class JobOutcome:
    status: str  # succeeded | partial | guarded | failed
    result: dict[str, Any]
    error: str | None = None
