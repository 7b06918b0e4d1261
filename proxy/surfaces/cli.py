"""The `spendgate` command line. Exit 0 on success; otherwise one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import csv
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.config import ConfigError, Settings
from proxy.display import csv_row, visible
from proxy.types import CAP_POLICIES, GROUPS, PERIODS, RateLimits, parse_instant

# Commands import what they use when they run, so `spendgate --help` (and every command that does not need
# them) starts without SQLAlchemy, Alembic or aiohttp; tests/test_cli_errors.py checks it.
if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.engine import URL

    from proxy.ledger.disk import Replayed
    from proxy.ledger.teams import TeamSettings
    from proxy.pricing.table import PriceTable

logger = logging.getLogger("spendgate")
# Accepted by `teams update` to remove a limit rather than leave it unchanged.
CLEAR_WORDS = ("none", "unlimited", "all")
RATE_OPTIONS = ("rpm", "itpm", "otpm")
# Exit status of a check that found something to fix (stale prices, drift from Anthropic's own figures).
DRIFT = 4


class UsageError(Exception):
    """A command-line value we cannot use."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spendgate` console script."""
    parser = _parser()
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


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.alerts import notify_now
    from proxy.ledger.db import in_memory, upgrade
    from proxy.ledger.disk import replay_spilled
    from proxy.logs import configure_logging
    from proxy.serving import run

    settings = Settings.from_environ(
        os.environ, db_url=args.db, host=args.host, port=args.port, upstream_url=args.upstream, workers=args.workers
    )
    if settings.anthropic_api_key is None:
        raise UsageError(
            "ANTHROPIC_API_KEY is not set: spendgate forwards calls with your Anthropic API key, so set it "
            "(export ANTHROPIC_API_KEY=sk-ant-...) and start again."
        )
    configure_logging(settings.log_format)
    url = _check_url(settings.db_url)
    if settings.workers > 1 and in_memory(url):
        raise UsageError(
            "--workers needs a ledger every worker can open: an in-memory SQLite database would be one per worker. "
            "Use a SQLite file or PostgreSQL."
        )
    _check_listenable(settings.host, settings.port, "--port (or SPENDGATE_PORT)")
    if settings.metrics_addr is not None:
        _check_listenable(*settings.metrics_addr, "SPENDGATE_METRICS_ADDR")
    upgrade(settings.db_url)
    with _ledger(settings) as engine:
        # Records spilled at an earlier shutdown; the journals of gone processes are replayed by every serving
        # process as it starts (proxy/app.py), so a restarted worker replays its dead sibling's too.
        spilled = replay_spilled(engine, settings.spill_dir, name="replay", soft_fraction=settings.soft_limit_fraction)
    notify_now(settings.alert_webhook, spilled.crossed)
    logger.info(
        "spendgate serving on http://%s:%d with %d worker(s), forwarding to %s",
        settings.host,
        settings.port,
        settings.workers,
        settings.upstream_url,
    )
    run(settings)
    return 0


def _check_listenable(host: str, port: int, setting: str) -> None:
    """A one-line `UsageError` for an address `serve` could not listen on (most often a port another server holds,
    such as a `spendgate serve` already running): uvicorn would find out only after migrating and starting up,
    and say so in a log line among others. `setting` is what chooses another port."""
    import errno
    import socket

    # Bound the way uvicorn binds (SO_REUSEADDR: a port in TIME_WAIT is free, one listened on is not), then let go.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"port {port} on {host} is already in use (another `spendgate serve`?): stop that server, or "
                    f"choose another port with {setting}."
                ) from None
            raise UsageError(f"cannot listen on {host} port {port}: {exc.strerror}") from None


@contextlib.contextmanager
def _ledger(settings: Settings) -> Iterator[Engine]:
    """An engine on a ledger that exists and is migrated; a one-line `UsageError` naming the fix otherwise."""
    from proxy.ledger.db import head_revision, make_engine, migration_of

    url = _check_url(settings.db_url)
    shown = url.render_as_string(hide_password=True)
    database = Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None
    if database is not None and database.parent.is_dir() and not database.exists():
        # SQLite would create an empty file here and then fail on the first query. (Where the folder is missing
        # it cannot, and `db upgrade` would not help: opening fails, and `_ledger_failure` says why.)
        raise UsageError(
            f"no ledger at {shown}. Run `spendgate db upgrade --db {shown}` to create it, or pass --db (or set "
            "SPENDGATE_DB_URL) to the ledger `spendgate serve` uses."
        )
    engine = make_engine(settings.db_url)
    try:
        current = migration_of(engine)
        if current != head_revision():
            state = "has no spendgate schema" if current is None else f"is at migration {current}"
            raise UsageError(f"the ledger at {shown} {state}. Run `spendgate db upgrade --db {shown}` first.")
        yield engine
    finally:
        engine.dispose()


def _check_url(db_url: str) -> URL:
    """The parsed URL of a database spendgate supports; a one-line `UsageError` otherwise."""
    from sqlalchemy.exc import ArgumentError

    from proxy.ledger.db import normalize_url

    try:
        url = normalize_url(db_url)
    except ArgumentError:
        raise UsageError(f"{db_url!r} is not a database URL (e.g. sqlite:///./spendgate.db).") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise UsageError(
            f"spendgate keeps its ledger in SQLite or PostgreSQL, not {url.get_backend_name()}: use sqlite:///PATH "
            "or postgresql://USER@HOST/DB."
        )
    return url


def _recover(engine: Engine, directory: Path, prices: PriceTable, soft_fraction: Decimal) -> Replayed:
    """Replay journals of gone processes, spill files and records set aside as refused."""
    from proxy.ledger.disk import replay_refused, replay_spilled
    from proxy.ledger.journal import replay_gone

    total = replay_gone(engine, directory, prices, name="replay", soft_fraction=soft_fraction)
    for step in (replay_spilled, replay_refused):
        total += step(engine, directory, name="replay", soft_fraction=soft_fraction)
    return total


def _journal_replay(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.alerts import notify_now
    from proxy.pricing.table import PriceTable

    with _ledger(settings) as engine:
        prices = PriceTable.load(settings.prices_path)
        done = _recover(engine, Path(args.directory), prices, settings.soft_limit_fraction)
    notify_now(settings.alert_webhook, done.crossed)
    print(f"replayed {args.directory}: {done.written} records written, {done.set_aside} set aside (refused-*.jsonl)")
    return 0


def _db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.db import upgrade

    url = _check_url(settings.db_url)
    upgrade(settings.db_url)
    print(f"database is at the newest migration: {url.render_as_string()}")
    return 0


def _teams_create(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.teams import create_team

    with _ledger(settings) as engine:
        view = create_team(engine, args.name, _team_settings(args), actor=_actor())
    print(json.dumps(view.to_json()))
    return 0


def _teams_update(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.teams import update_team

    with _ledger(settings) as engine:
        view = update_team(engine, args.name, _team_settings(args), actor=_actor())
    print(json.dumps(view.to_json()))
    return 0


def _teams_list(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.teams import list_teams

    with _ledger(settings) as engine:
        views = [view.to_json() for view in list_teams(engine)]
    if args.format == "json":
        print(json.dumps(views, indent=2))
        return 0
    columns = ("name", "budget_usd", "period", "spent_usd", "held_usd", "remaining_usd", "max_output_tokens")
    _print_table(columns, _money_shown(views))
    return 0


def _teams_users(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.teams import list_users

    with _ledger(settings) as engine:
        views = [view.to_json() for view in list_users(engine, args.name)]
    if args.format == "json":
        print(json.dumps(views, indent=2))
        return 0
    _print_table(("user", "budget_usd", "own_budget", "spent_usd", "held_usd", "remaining_usd"), _money_shown(views))
    return 0


def _teams_user_budget(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.teams import UNSET, set_user_budget

    if (args.budget is None) == (not args.clear):
        raise UsageError("give either --budget USD (or 'none') or --clear")
    budget = UNSET if args.clear else _given(args.budget, _money)
    with _ledger(settings) as engine:
        view = set_user_budget(engine, args.name, args.user, budget, actor=_actor())
    print(json.dumps(view.to_json()))
    return 0


def _keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.teams import create_key

    with _ledger(settings) as engine:
        view, key = create_key(
            engine,
            args.team,
            actor=_actor(),
            name=args.name,
            budget_usd=_money(args.budget) if args.budget is not None else None,
            period=args.period,
            rates=RateLimits(**{name: _given(getattr(args, name) or "none", _positive_int) for name in RATE_OPTIONS}),
        )
    if args.format == "json":
        print(json.dumps({**view.to_json(), "key": key}))
        return 0
    print(f"created key {view.id} for team {view.team} (shown once; store it now):")
    print(key)
    return 0


def _keys_update(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.teams import update_key

    changes = {name: _given(getattr(args, name), _positive_int) for name in RATE_OPTIONS}
    with _ledger(settings) as engine:
        view = update_key(engine, args.key_id, actor=_actor(), **changes)
    print(json.dumps(view.to_json()))
    return 0


def _keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.teams import revoke_key

    with _ledger(settings) as engine:
        view = revoke_key(engine, args.key_id, actor=_actor())
    print(f"revoked key {view.id} of team {view.team}")
    return 0


def _keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.teams import list_keys

    with _ledger(settings) as engine:
        views = [view.to_json() for view in list_keys(engine, team=args.team)]
    if args.format == "json":
        print(json.dumps(views, indent=2))
    else:
        columns = ("id", "team", "name", "prefix", "budget_usd", "period", "created_at", "revoked_at")
        _print_table(columns, _money_shown(views))
    return 0


def _usage(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.export import iter_usage, write_csv, write_jsonl
    from proxy.ledger.teams import get_team

    since, until = _instant(args.since), _instant(args.until)
    writer = write_csv if args.format == "csv" else write_jsonl
    with _ledger(settings) as engine, _progress("exporting usage records", "records") as advance:
        if args.team is not None:
            # A filter naming no team would print nothing and succeed: a typo would pass for a team without calls.
            get_team(engine, args.team)
        records = iter_usage(engine, team=args.team, since=since, until=until)
        writer((_counted(record, n, advance) for n, (_, record) in enumerate(records, 1)), sys.stdout)
    return 0


def _counted(record: dict[str, Any], n: int, advance: Callable[[int, int | None], None]) -> dict[str, Any]:
    if n % 1000 == 0:
        advance(n, None)
    return record


@contextlib.contextmanager
def _progress(what: str, unit: str) -> Iterator[Callable[[int, int | None], None]]:
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


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.reports import report
    from proxy.pricing.table import PriceTable

    by = [name.strip() for name in args.by.split(",") if name.strip()] if args.by else []
    since, until = _instant(args.since), _instant(args.until)
    with _ledger(settings) as engine:
        rows = [
            row.to_json()
            for row in report(engine, PriceTable.load(settings.prices_path), by=by, since=since, until=until)
        ]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        _print_csv(list(rows[0]) if rows else by, rows)
    else:
        columns = [
            *by,
            "calls",
            "input_tokens",
            "output_tokens",
            "cost_usd",
            "retries",
            "retry_cost_usd",
            "cache_savings_usd",
            "batch_savings_usd",
            "unpriced_calls",
        ]
        _print_table(columns, _money_shown(rows))
    return 0


def _audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.audit import verify

    with _ledger(settings) as engine, _progress("verifying the audit chain", "entries") as advance:
        verdict = verify(engine, progress=advance)
    if verdict.problem is not None:
        print(f"spendgate: audit chain broken after {verdict.entries} good entries: {verdict.problem}", file=sys.stderr)
        return 3
    print(f"audit chain intact: {verdict.entries} entries, head {verdict.head_pos} {verdict.head_hash}")
    return 0


def _audit_export(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.audit import iter_events
    from proxy.ledger.export import write_jsonl

    with _ledger(settings) as engine:
        write_jsonl(iter_events(engine, since=_instant(args.since)), sys.stdout)
    return 0


def _reprice(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.reprice import recount_current, reprice
    from proxy.pricing.table import PriceTable

    since, until = _instant(args.since), _instant(args.until)
    if since is None:
        raise UsageError("--since is required")
    prices = PriceTable.load(settings.prices_path)
    with _ledger(settings) as engine:
        result = reprice(engine, prices, since=since, until=until, actor=_actor())
        recount_current(engine, datetime.now(UTC))
    print(
        json.dumps(
            {
                "examined": result.examined,
                "changed": result.changed,
                "cost_before_usd": format(result.total_before, "f"),
                "cost_after_usd": format(result.total_after, "f"),
                "audit_entry": result.event_pos,
            }
        )
    )
    return 0


def _prices(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.pricing.table import PriceTable

    table = PriceTable.load(settings.prices_path)
    if args.format == "json":
        print(json.dumps(table.to_json(model=args.model, at=datetime.now(UTC)), indent=2))
        return 0
    print(table.describe(model=args.model, at=datetime.now(UTC)))
    return 0


def _prices_check(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.ledger.reports import price_fallbacks

    with _ledger(settings) as engine:
        found = [f.to_json() for f in price_fallbacks(engine, since=_instant(args.since), until=_instant(args.until))]
    if args.format == "json":
        print(json.dumps(found, indent=2))
    elif found:
        _print_table(("model", "price_source", "calls", "first_seen", "last_seen"), found)
    else:
        print("every call in the period was priced from the table")
    return DRIFT if found else 0


def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.reconcile.anthropic import AdminClient
    from proxy.reconcile.compare import ledger_buckets, reconcile

    if settings.anthropic_admin_key is None:
        raise UsageError(
            "SPENDGATE_ANTHROPIC_ADMIN_KEY is not set: reconcile reads Anthropic's usage and cost reports with an "
            "Admin API key (Console > Settings > Admin keys, sk-ant-admin...)."
        )
    since, until = parse_instant(args.since).astimezone(UTC), parse_instant(args.until).astimezone(UTC)
    if until <= since:
        raise UsageError(f"--until {args.until} is not after --since {args.since}")
    tolerance = _money(args.tolerance) if args.tolerance is not None else settings.reconcile_tolerance
    client = AdminClient(
        settings.anthropic_admin_key, base_url=settings.admin_api_url, api_key_id=settings.anthropic_api_key_id
    )
    # Cost is compared per UTC day: whole days around the period, on both sides.
    first_day = since.replace(hour=0, minute=0, second=0, microsecond=0)
    last_day = until.replace(hour=0, minute=0, second=0, microsecond=0)
    days = (first_day, last_day if last_day == until else last_day + timedelta(days=1))
    with _ledger(settings) as engine:
        result = reconcile(
            ledger_tokens=ledger_buckets(engine, since, until, args.by),
            ledger_days=ledger_buckets(engine, *days, "day"),
            usage=client.usage(since, until, args.by),
            cost=client.cost(*days),
            width=args.by,
            now=datetime.now(UTC),
            tolerance_usd=tolerance,
            key_id_known=settings.anthropic_api_key_id is not None,
        )
    rows = [difference.to_json() for difference in result.differences]
    if args.format == "json":
        print(json.dumps({"drift": result.drifted, "buckets": result.buckets_compared, "differences": rows}, indent=2))
    elif args.format == "csv":
        _print_csv(list(rows[0]) if rows else ["bucket"], rows)
    elif rows:
        _print_table(
            ("bucket", "model", "service_tier", "measure", "ledger", "anthropic", "delta", "final", "cause"), rows
        )
    else:
        print(f"no differences: {result.buckets_compared} buckets agree with Anthropic's reports")
    return DRIFT if result.drifted else 0


def _actor() -> str:
    """Who the audit trail says made a change from the command line."""
    return f"cli:{getpass.getuser()}"


def _team_settings(args: argparse.Namespace) -> TeamSettings:
    from proxy.ledger.teams import UNSET, TeamSettings

    return TeamSettings(
        budget_usd=_given(args.budget, _money),
        period=args.period if args.period is not None else UNSET,
        max_output_tokens=_given(args.max_output_tokens, _positive_int),
        cap_policy=args.cap_policy if args.cap_policy is not None else UNSET,
        models=_given(args.models, _models),
        retry_window_seconds=_seconds(args.retry_window) if args.retry_window is not None else UNSET,
        user_budget_usd=_given(args.user_budget, _money),
        **{name: _given(getattr(args, name), _positive_int) for name in RATE_OPTIONS},
    )


def _given(value: str | None, parse: Callable[[str], Any]) -> Any:
    """An option that may clear a limit: not given (`UNSET`), 'none' (no limit), or `parse`d."""
    from proxy.ledger.teams import UNSET

    if value is None:
        return UNSET
    if value.lower() in CLEAR_WORDS:
        return None
    return parse(value)


def _money(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise UsageError(f"{text!r} is not an amount in USD (e.g. 250 or 12.50)") from None
    if not value.is_finite() or value < 0:
        raise UsageError(f"{text!r} is not an amount in USD (e.g. 250 or 12.50)")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{text!r} is not a positive whole number")
    return int(text)


def _seconds(text: str) -> int:
    if not text.isdigit():
        raise UsageError(f"{text!r} is not a whole number of seconds")
    return int(text)


def _models(text: str) -> tuple[str, ...]:
    from proxy.pricing.table import PriceTable

    models = tuple(model.strip() for model in text.split(",") if model.strip())
    if not models:
        raise UsageError("--models needs at least one model id (or 'all' to allow every model)")
    prices, now = PriceTable.load(Settings.from_environ(os.environ).prices_path), datetime.now(UTC)
    for model in models:
        if prices.lookup(model, now) is None:
            # Allowed all the same (a model newer than this table), but a typo would silently refuse every call.
            print(f"spendgate: warning: model {model!r} is not in the price table (a typo?)", file=sys.stderr)
    return models


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1 to 65535)")
    return int(text)


def _instant(text: str | None) -> datetime | None:
    return None if text is None else parse_instant(text)


def _rate_options(parser: argparse.ArgumentParser, whose: str) -> None:
    for name, what in zip(
        RATE_OPTIONS, ("requests", "input tokens (uncached and cache writes)", "output tokens"), strict=True
    ):
        parser.add_argument(f"--{name}", metavar="N", help=f"{whose} {what} per minute; 'none' for no limit")


def _money_shown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def _print_table(columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    cells = [[("-" if row[c] is None else visible(str(row[c]))) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _print_csv(columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_row(row) for row in rows)


def _default(variable: str, value: object) -> str:
    """How every option's help names the environment variable it overrides, and the default without either."""
    return f"(default: ${variable}, else {value})"


class _Version(argparse.Action):
    """`--version`: the installed package's version, looked up only when asked for (importlib.metadata takes
    longer to load than `--help` takes to run)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **_: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and exit")

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        from importlib.metadata import version

        print(f"spendgate {version('spendgate')}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spendgate", description="A metering proxy for Anthropic's Messages API.")
    parser.add_argument("--version", action=_Version)
    defaults = Settings()
    db_help = f"SQLAlchemy database URL {_default('SPENDGATE_DB_URL', defaults.db_url)}"
    parser.add_argument("--db", metavar="URL", help=db_help)
    commands = parser.add_subparsers(metavar="COMMAND")

    def command(parent: Any, name: str, run: Callable[..., int], help: str, *, db: bool = True) -> Any:
        sub = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        if db:
            # Before or after the subcommand alike; SUPPRESS keeps an absent one from hiding a global one.
            sub.add_argument("--db", metavar="URL", help=db_help, default=argparse.SUPPRESS)
        return sub

    def group(name: str, help: str) -> Any:
        parent = commands.add_parser(name, help=help, description=help)
        parent.set_defaults(group=parent)
        return parent.add_subparsers(metavar="COMMAND")

    serve = command(commands, "serve", _serve, "migrate the database, then serve the proxy")
    serve.add_argument("--host", help=f"listen address {_default('SPENDGATE_HOST', defaults.host)}")
    serve.add_argument("--port", type=_port, help=f"listen port {_default('SPENDGATE_PORT', defaults.port)}")
    serve.add_argument(
        "--upstream", metavar="URL", help=f"where calls go {_default('SPENDGATE_UPSTREAM_URL', defaults.upstream_url)}"
    )
    serve.add_argument(
        "--workers",
        type=int,
        help=f"serving processes, each a replica on the same ledger {_default('SPENDGATE_WORKERS', defaults.workers)}",
    )

    db = group("db", "database maintenance")
    command(db, "upgrade", _db_upgrade, "run the migrations to the newest version")

    teams = group("teams", "manage teams")
    for name, run, help in (
        ("create", _teams_create, "create a team"),
        ("update", _teams_update, "change a team (options not given stay as they are)"),
    ):
        sub = command(teams, name, run, help)
        sub.add_argument("name")
        sub.add_argument("--budget", metavar="USD", help="spend limit per period; 'none' for unlimited")
        sub.add_argument("--period", choices=PERIODS, help="budget period, calendar UTC (default: month)")
        sub.add_argument("--max-output-tokens", metavar="N", help="cap on max_tokens; 'none' for no cap")
        sub.add_argument("--cap-policy", choices=CAP_POLICIES, help="clamp max_tokens to the cap, or reject the call")
        sub.add_argument("--models", metavar="MODEL,MODEL", help="allowed models; 'all' for every model")
        sub.add_argument(
            "--retry-window",
            metavar="SECONDS",
            help="flag an identical request from the same key within this window as a repeat (default 600; 0: off)",
        )
        sub.add_argument(
            "--user-budget",
            metavar="USD",
            help="each end user's spend limit per period (x-spendgate-user, else metadata.user_id); 'none' for off",
        )
        _rate_options(sub, "the team's")
    team_users = command(teams, "users", _teams_users, "a team's end users this period, against their allowance")
    team_users.add_argument("name")
    team_users.add_argument("--format", choices=("table", "json"), default="table")
    user_budget = command(teams, "user-budget", _teams_user_budget, "give one end user their own budget")
    user_budget.add_argument("name")
    user_budget.add_argument("user", help="the end user ('' for calls that carry no user)")
    user_budget.add_argument("--budget", metavar="USD", help="their spend limit per period; 'none' for no limit")
    user_budget.add_argument("--clear", action="store_true", help="the team's per-user budget applies again")
    team_list = command(teams, "list", _teams_list, "list teams with their spend this period")
    team_list.add_argument("--format", choices=("table", "json"), default="table")

    keys = group("keys", "manage client keys")
    key_create = command(keys, "create", _keys_create, "create a client key (printed once, on the last line)")
    key_create.add_argument("--team", required=True)
    key_create.add_argument("--name", help="a label for the key")
    key_create.add_argument("--budget", metavar="USD", help="the key's own spend limit per period")
    key_create.add_argument("--period", choices=PERIODS, default="month")
    key_create.add_argument("--format", choices=("text", "json"), default="text")
    _rate_options(key_create, "the key's own")
    key_update = command(keys, "update", _keys_update, "change a key's rate limits (options not given stay)")
    key_update.add_argument("key_id")
    _rate_options(key_update, "the key's own")
    key_revoke = command(keys, "revoke", _keys_revoke, "revoke a key")
    key_revoke.add_argument("key_id")
    key_list = command(keys, "list", _keys_list, "list keys (never the keys themselves)")
    key_list.add_argument("--team")
    key_list.add_argument("--format", choices=("table", "json"), default="table")

    usage = command(commands, "usage", _usage, "print usage records, oldest first")
    usage.add_argument("--team")
    usage.add_argument("--since", metavar="ISO8601")
    usage.add_argument("--until", metavar="ISO8601")
    usage.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")

    report_command = command(commands, "report", _report, "totals of calls, tokens, cost and retry cost, grouped")
    report_command.add_argument("--by", metavar="FIELD,FIELD", help=f"group by any of {','.join(GROUPS)}")
    report_command.add_argument("--since", metavar="ISO8601")
    report_command.add_argument("--until", metavar="ISO8601")
    report_command.add_argument("--format", choices=("table", "csv", "json"), default="table")

    audit = group("audit", "the tamper-evident audit trail")
    command(audit, "verify", _audit_verify, "check the hash chain of usage records and admin events")
    audit_export = command(audit, "export", _audit_export, "print admin events as JSON lines, oldest first")
    audit_export.add_argument("--since", metavar="ISO8601")

    reprice_command = command(
        commands, "reprice", _reprice, "recompute stored costs with the current price table (originals are kept)"
    )
    reprice_command.add_argument("--since", metavar="ISO8601", required=True)
    reprice_command.add_argument("--until", metavar="ISO8601")

    journal = group("journal", "crash journals and spilled records")
    journal_replay = command(
        journal,
        "replay",
        _journal_replay,
        "write to the ledger what processes that are gone left in DIR: journals (unfinished calls become "
        "'interrupted' records at their worst case), spill files, and records set aside as refused",
    )
    journal_replay.add_argument("directory", metavar="DIR")

    reconcile_command = command(
        commands,
        "reconcile",
        _reconcile,
        "compare the ledger with Anthropic's usage and cost reports (SPENDGATE_ANTHROPIC_ADMIN_KEY); exit 4 on drift",
    )
    reconcile_command.add_argument("--since", metavar="ISO8601", required=True)
    reconcile_command.add_argument("--until", metavar="ISO8601", required=True)
    reconcile_command.add_argument("--by", choices=("hour", "day"), default="day", help="token buckets (cost: daily)")
    tolerance = _default("SPENDGATE_RECONCILE_TOLERANCE", defaults.reconcile_tolerance)
    reconcile_command.add_argument("--tolerance", metavar="USD", help=f"cost difference that is not drift {tolerance}")
    reconcile_command.add_argument("--format", choices=("table", "json", "csv"), default="table")

    prices = command(commands, "prices", _prices, "show the price table in force", db=False)
    prices.add_argument("--model")
    prices.add_argument("--format", choices=("text", "json"), default="text")
    check = command(
        prices.add_subparsers(metavar="COMMAND"),
        "check",
        _prices_check,
        "list models in the ledger priced by a family fallback or not at all (exit 4 if any: the table is stale)",
    )
    check.add_argument("--since", metavar="ISO8601")
    check.add_argument("--until", metavar="ISO8601")
    check.add_argument("--format", choices=("table", "json"), default="table")
    return parser


if __name__ == "__main__":
    sys.exit(main())
