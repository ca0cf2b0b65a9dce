"""What counts as an anomalous optimizer step, and the bookkeeping of rollbacks.

Every rank decides from the same numbers: the step's flags and mean loss come from the step's one all-reduce, so all
ranks agree without another synchronisation. The loss history and the rollbacks so far are part of the checkpoint
(`state_dict`), so that a resumed run decides as the uninterrupted one would have.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any


class OnAnomaly(enum.StrEnum):
    STOP = "stop"  # one line and exit 2 (a loss spike is only logged)
    ROLLBACK = "rollback"  # reload the newest checkpoint before the step, skip its batches and a margin, go on


@dataclass(frozen=True)
class AnomalySettings:
    on_anomaly: OnAnomaly
    spike_factor: float  # a step's loss above this times the median of the last `spike_window` steps; 0: off
    spike_window: int
    skip_margin: int  # optimizer steps of data left out after the anomalous step's own
    max_rollbacks: int  # more than this many rollbacks within `rollback_period` steps: stop
    rollback_period: int


class TooManyRollbacks(Exception):
    pass


class AnomalyDetector:
    def __init__(self, settings: AnomalySettings):
        self.settings = settings
        self.losses: deque[float] = deque(maxlen=settings.spike_window)
        self.rollbacks: list[dict[str, Any]] = []  # {step, cause, loss, to_step}, in the order they happened

    def check(self, step: int, loss: float, nonfinite: bool) -> str | None:
        """The cause if step `step` (its loss, averaged over the global batch) is anomalous, else None (and the
        loss joins the history)."""
        if nonfinite or not math.isfinite(loss):
            return "non-finite loss"
        s = self.settings
        if s.spike_factor and len(self.losses) == s.spike_window:
            median = statistics.median(self.losses)
            if loss > s.spike_factor * median:
                return f"loss spike: {loss:.4g} > {s.spike_factor:g} x {median:.4g}, the median of the last {s.spike_window} steps"
        self.losses.append(loss)
        return None

    def rolled_back(self, step: int, cause: str, loss: float, to_step: int) -> None:
        """Record a rollback; raise TooManyRollbacks naming them when there are more than allowed in the period."""
        self.rollbacks.append({"step": step, "cause": cause, "loss": loss, "to_step": to_step})
        recent = [r for r in self.rollbacks if r["step"] > step - self.settings.rollback_period]
        if len(recent) > self.settings.max_rollbacks:
            named = "; ".join(f"step {r['step']} ({r['cause']})" for r in recent)
            raise TooManyRollbacks(
                f"{len(recent)} rollbacks within {self.settings.rollback_period} steps, more than --max-rollbacks "
                f"{self.settings.max_rollbacks}: {named}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's history; the rollbacks this process knows of stay (a rollback goes back to a checkpoint
        written before it)."""
        state = state or {}
        self.losses = deque(state.get("losses", []), maxlen=self.settings.spike_window)
        known = {(r["step"], r["cause"]) for r in self.rollbacks}
        self.rollbacks += [r for r in state.get("rollbacks", []) if (r["step"], r["cause"]) not in known]
