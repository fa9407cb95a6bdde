"""Where a command may write: never onto one of its inputs, never over what it did not write itself.

Every entry point that writes (tools/model_table.py, tools/analyze.py, tools/report.py,
tools/benchmark_diagnostics.py, ablations/sweep.py) calls `check_output` on each file or folder a
user's argument makes it write, before it computes anything. A target is refused with an
`OutputError` (a `UserError`: one `error: ...` line naming the path and why, exit code 2) when

- it is one of the command's inputs (resolved paths compared, hard links included), or, for a
  folder the command deletes and rewrites (`replaces`), an input lies inside it;
- it exists as the wrong kind (a folder where a file is written, or the reverse);
- it exists, is not empty, and `own(path)` does not recognise it as the command's own earlier
  output (each tool knows its own: model_table's JSON table, analyze's analysis.json, the
  report's report.md, a sweep's sweep.json), so a rerun into the same place keeps working.

An empty file or folder holds nothing to lose and may always be written. Lives in ablations/ so
that both tools/ and ablations/ can use it (nothing may import tools/).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from models.errors import UserError

# A recogniser reads at most this much of a file: a table, analysis or manifest is far smaller.
MAX_OWN_BYTES = 64 * 2**20


class OutputError(UserError):
    """A command was asked to write over one of its inputs, or over a file or folder it did not write."""


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _inside(inner: Path, outer: Path) -> bool:
    return inner.resolve().is_relative_to(outer.resolve())


def _is_empty(path: Path) -> bool:
    return not any(path.iterdir()) if path.is_dir() else path.stat().st_size == 0


def check_output(path: str | Path, option: str, *, inputs: Iterable[str | Path] = (), folder: bool = False,
                 own: Callable[[Path], bool] | None = None, own_what: str = "its own earlier output",
                 replaces: bool = False) -> Path:
    """`Path(path)` when the command may write it (a file, or with `folder` a folder), else OutputError.

    `option` names the argument the path came from (in the message); `inputs` are the files and folders
    the command reads; `own(path)` says whether an existing, non-empty target is the command's own earlier
    output (None: nothing existing is reused), described by `own_what` in the message; `replaces`: the
    folder is deleted and rewritten, so an input inside it is refused too.
    """
    path = Path(path)
    for given in inputs:
        source = Path(given)
        if _same(path, source):
            raise OutputError(f"refusing to write {path} ({option}): it is one of this command's inputs")
        if replaces and _inside(source, path):
            raise OutputError(f"refusing to replace {path} ({option}): it holds the input {source}")
    if not path.exists():
        return path
    if folder and not path.is_dir():
        raise OutputError(f"refusing to write into {path} ({option}): it is a file, not a folder")
    if not folder and path.is_dir():
        raise OutputError(f"refusing to write {path} ({option}): it is a folder, not a file")
    if _is_empty(path) or (own is not None and own(path)):
        return path
    what = "not empty" if own is None else f"not empty and not {own_what}" if folder else f"not {own_what}"
    raise OutputError(f"refusing to overwrite {path} ({option}): it exists and is {what}; "
                      f"move it away or choose another {option}")


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing, too large, not text or not JSON (for `own` checks)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_OWN_BYTES:
            return None
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def read_head(path: Path, size: int = 4096) -> str:
    """The first `size` characters of a text file, or "" when it is missing or not text (for `own` checks)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(size)
    except (OSError, UnicodeDecodeError):
        return ""
