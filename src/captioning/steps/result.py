"""What every step returns, and what the runners write into the summary JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StepResult:
    status: str = "ok"  # ok | failed | skipped
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. process_data's "skipped"
    # The step's KFP output parameters (e.g. the W&B reference, the gate's score); not in the summary.
    returns: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("returns")
        extra = data.pop("extra")
        data.update(extra)
        return data
