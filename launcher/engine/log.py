"""One voice: rank 0 logs; another rank speaks only about itself (prefixed with its rank)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console

from ..progress import Progress
from ..tracking import Tracker


class RankLog:
    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank = rank
        self.world_size = world_size
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)
        self.is_main = rank == 0
        self.metrics_path: Path | None = None
        self.progress = Progress(self.console, enabled=self.is_main)  # bars on rank 0, on a terminal only
        self.tracker = Tracker()  # the run's experiment trackers (launcher/tracking.py); rank 0 only

    def info(self, message: str) -> None:
        if self.is_main:
            self.console.print(message, markup=False)

    def rank_warning(self, message: str) -> None:
        """A warning that concerns this rank; printed by whichever rank has it."""
        prefix = f"[rank {self.rank}] " if self.world_size > 1 else ""
        print(f"warning: {prefix}{message}", file=sys.stderr, flush=True)

    def event(self, record: dict) -> None:
        """Append one line to metrics.jsonl and hand it to the trackers (rank 0 only)."""
        if not self.is_main or self.metrics_path is None:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.tracker.record(record)


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
