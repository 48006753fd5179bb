"""Rich progress bars for training and evaluation (one live display, several tasks)."""

from __future__ import annotations

from collections.abc import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# Called as hook(done, total) as long work advances (e.g. evaluation driving a progress bar).
ProgressHook = Callable[[int, int], None]


def progress_bar(enabled: bool) -> Progress:
    """A progress display whose tasks show a description, a bar, n/total, a note and the ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def progress_hook(bar: Progress, description: str) -> ProgressHook:
    """A hook for `evaluate(..., on_progress=...)` that drives a task of `bar`, hidden when done."""
    task_id = bar.add_task(description, total=None, note="", visible=False)

    def hook(done: int, total: int) -> None:
        bar.update(task_id, completed=done, total=total, visible=done < total)

    return hook
