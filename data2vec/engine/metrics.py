"""Metrics to JSONL (always) and TensorBoard (when installed and enabled)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends ``{"step": ..., "time": ..., **metrics}`` lines to ``<run>/metrics.jsonl``.

    Args:
        run_dir: the run directory.
        tensorboard: also write TensorBoard event files under ``<run>/tb``.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except Exception as exc:  # tensorboard missing or broken: JSONL still works
                log.warning("TensorBoard logging disabled: %s", exc)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self._fh.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
