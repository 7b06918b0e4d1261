"""The `spendgate` console script: run the command given, and make any failure one line and an exit status."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy.cli.errors import UsageError
from proxy.cli.parser import build_parser
from proxy.config import ConfigError, Settings
from proxy.display import visible


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spendgate` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        # A command group without its subcommand (`spendgate teams`): that group's help, not the top level's.
        getattr(args, "group", parser).print_help(sys.stderr)
        return 2
    settings: Settings | None = None
    try:
        settings = Settings.from_environ(os.environ, db_url=getattr(args, "db", None))
        result: int = args.run(args, settings)
        sys.stdout.flush()
        return result
    except BrokenPipeError:
        # `spendgate usage | head`: the reader has all it wanted. Point stdout at /dev/null so the interpreter's
        # own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("spendgate: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            told = str(exc)
        else:
            failure = None if settings is None else _ledger_failure(exc, settings.db_url)
            told = failure or f"{exc.__class__.__name__}: {exc}"
        # Messages may quote what others sent (an Admin API's error text, a client's user id): one line, inert.
        print(f"spendgate: {visible(told)}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story; those of modules a command never loaded cannot have happened."""
    known: list[type[Exception]] = [ConfigError, UsageError, ValueError]
    for module, names in (
        ("proxy.ledger.teams", ("NotFound", "Conflict")),
        ("proxy.pricing.table", ("PriceError",)),
        ("proxy.reconcile.anthropic", ("ReportError",)),
    ):
        if module in sys.modules:
            known += [getattr(sys.modules[module], name) for name in names]
    return tuple(known)


def _ledger_failure(exc: Exception, db_url: str) -> str | None:
    """The CLI's one map of database failures, for every command: what kept it from using the ledger (PostgreSQL
    down or refusing us, a SQLite file or its lock file that cannot be made), as a line naming the ledger's URL
    with the password hidden; None when `exc` is no such failure."""
    if "sqlalchemy" not in sys.modules:
        # Nothing loaded SQLAlchemy: no database was opened.
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from proxy.ledger.db import in_memory

    try:
        url = make_url(db_url)
    except ArgumentError:
        return None
    database = url.database if url.get_backend_name() == "sqlite" and not in_memory(url) else None
    if isinstance(exc, DBAPIError):
        # The driver's own words; SQLAlchemy's text would add the statement and its parameters.
        cause = str(exc.orig)
    elif isinstance(exc, OSError) and database and str(exc.filename).startswith(database):
        cause = f"{exc.strerror}: {exc.filename}"
    else:
        return None
    if database and not Path(database).parent.is_dir():
        # SQLite itself says only "unable to open database file".
        cause = f"folder {Path(database).parent} does not exist"
    cause = "; ".join(line.strip() for line in cause.splitlines() if line.strip())
    return f"cannot use the ledger at {url.render_as_string(hide_password=True)}: {cause}"
