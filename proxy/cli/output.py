"""What commands print: tables and CSV on stdout, money as people read it, and progress on a terminal."""

from __future__ import annotations

import contextlib
import csv
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from proxy.display import csv_row, visible


@contextlib.contextmanager
def progress(what: str, unit: str) -> Iterator[Callable[[int, int | None], None]]:
    """A progress bar on stderr while a long command runs, only when stderr is a terminal (never in pipes,
    logs or CI); yields `advance(done, total)`."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def windows_shown(windows: list[dict[str, Any]]) -> str | None:
    """Budget windows in a table cell, spent of budget per window (`daily:2.5/10,monthly:40/100`); None: none."""
    shown = (f"{w['window']}:{_trimmed(w['spent_usd'])}/{_trimmed(w['budget_usd'])}" for w in windows)
    return ",".join(shown) or None


def money_shown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Money as tables show it. Amounts (`*_usd`) keep every significant digit and drop trailing zeros (`12.340000`
    is `12.34`; `250` stays `250`): cents would hide what calls cost, a fixed scale would still round some, and
    JSON keeps the ledger's exact text. `reserved_usd`, the name in JSON and the admin API (public, so kept), is
    shown as `held_usd`, the word the README and dashboard use."""
    shown = []
    for row in rows:
        named = {("held_usd" if name == "reserved_usd" else name): value for name, value in row.items()}
        shown.append({name: _trimmed(value) if name.endswith("_usd") else value for name, value in named.items()})
    return shown


def _trimmed(amount: str | None) -> str | None:
    """An exact decimal text without trailing zeros, nor a trailing point."""
    if amount is None or "." not in amount:
        return amount
    return amount.rstrip("0").rstrip(".")


def print_table(columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """`rows` as aligned columns under a header line; None as `-`, text others chose made inert."""
    cells = [[("-" if row[c] is None else visible(str(row[c]))) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def print_csv(columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """`rows` as CSV with a header, cells a spreadsheet will not run as formulas."""
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_row(row) for row in rows)
