"""Reading a run dir's state from outside the trainer (sweeps, reports)."""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY_FILE = "summary.json"


def read_summary(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_is_finished(run_dir: str | Path) -> bool:
    """True once the trainer has written a final summary (training ran to its last step)."""
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") == "finished"
