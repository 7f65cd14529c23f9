"""The command line's rich progress bar (one look for every long-running command)."""

from __future__ import annotations

from typing import Any


def progress_bar(console: Any, label: str, *fields: str) -> Any:
    """A ``rich`` Progress on ``console``: ``label`` and the task's description, a bar, done of
    total, one text column per ``fields`` template (task fields, e.g. ``"{task.fields[loss]}"``),
    then elapsed and remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{label}[/bold] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
