"""Progress on stderr: a rich bar with rate and ETA on a terminal, plain lines otherwise, nothing when quiet."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class _PlainProgress:
    """Log lines at most every `interval` seconds (and at the end) when stdout is not a terminal."""

    def __init__(self, description: str, total: int, interval: float = 10.0):
        self.description, self.total, self.interval = description, total, interval
        self.done, self.start, self.last = 0, time.monotonic(), 0.0
        self.fields: dict[str, object] = {}

    def advance(self, n: int = 1, **fields: object) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            extra = "".join(f" {k}={v}" for k, v in self.fields.items())
            print(
                f"{self.description}: {self.done}/{self.total} {rate:.2f}/s eta {eta:.0f}s{extra}",
                file=sys.stderr,
                flush=True,
            )


class _RichProgress:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1, **fields: object) -> None:
        info = " ".join(f"{k}={v}" for k, v in fields.items())
        self.progress.update(self.task, advance=n, info=info)


class _NoProgress:
    def advance(self, n: int = 1, **fields: object) -> None:
        pass


@contextmanager
def progress_bar(description: str, total: int, *, quiet: bool = False):
    """Yield an object with `advance(n=1, **fields)`; fields (loss, lr ...) are shown beside the bar."""
    if quiet:
        yield _NoProgress()
        return
    if not sys.stderr.isatty():
        yield _PlainProgress(description, total)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s")

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    from rich.console import Console

    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield _RichProgress(progress, progress.add_task(description, total=total, info=""))
