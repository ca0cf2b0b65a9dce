"""metrics.jsonl (one JSON object per logged step) and the same scalars in TensorBoard. Rank 0 writes."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)



class Metrics:
    def __init__(self, output: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = output / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._truncate_after(resume_step or 0)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=(resume_step + 1) if resume_step else None)
        self.file = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        """Lines logged after the checkpoint we resume from belong to a run that was lost: drop them."""
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        split = record.get("split", "train")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(f"{split}/{key}", value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
