"""The `spendgate` argument parser: every command, its options and their help, and the function that runs it."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from proxy.cli.login import run_key_helper, run_login
from proxy.cli.maintenance import (
    run_audit_export,
    run_audit_verify,
    run_db_upgrade,
    run_journal_replay,
    run_prune,
    run_reprice,
    run_rollups_rebuild,
)
from proxy.cli.prices import run_prices, run_prices_check
from proxy.cli.reconcile import run_reconcile
from proxy.cli.serve import run_serve
from proxy.cli.teams import (
    run_keys_create,
    run_keys_list,
    run_keys_revoke,
    run_keys_rotate,
    run_keys_update,
    run_teams_create,
    run_teams_list,
    run_teams_map_group,
    run_teams_update,
    run_teams_user_budget,
    run_teams_users,
)
from proxy.cli.usage import run_report, run_usage
from proxy.cli.values import RATE_OPTIONS
from proxy.config import Settings
from proxy.ledger.windows import WINDOW_NAMES, WINDOW_PERIODS
from proxy.types import BUDGET_EDGES, CAP_POLICIES, GROUPS, PERIODS


def build_parser() -> argparse.ArgumentParser:
    """The parser of `spendgate`'s arguments; each command sets `run(args, settings)`, each group `group`."""
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

    serve = command(commands, "serve", run_serve, "migrate the database, then serve the proxy")
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
    command(db, "upgrade", run_db_upgrade, "run the migrations to the newest version")

    teams = group("teams", "manage teams")
    for name, run, help in (
        ("create", run_teams_create, "create a team"),
        ("update", run_teams_update, "change a team (options not given stay as they are)"),
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
        _window_options(sub, "the team's")
        _window_options(sub, "each end user's", prefix="user-")
        sub.add_argument(
            "--budget-edge",
            choices=BUDGET_EDGES,
            help="a call worth more than a window has left: refuse it (default), or clamp its max_tokens to fit",
        )
        _rate_options(sub, "the team's")
    team_users = command(teams, "users", run_teams_users, "a team's end users this period, against their allowance")
    team_users.add_argument("name")
    team_users.add_argument("--format", choices=("table", "json"), default="table")
    user_budget = command(teams, "user-budget", run_teams_user_budget, "give one end user their own budget")
    user_budget.add_argument("name")
    user_budget.add_argument("user", help="the end user ('' for calls that carry no user)")
    user_budget.add_argument("--budget", metavar="USD", help="their spend limit per team period; 'none' for no limit")
    _window_options(user_budget, "their")
    user_budget.add_argument("--clear", action="store_true", help="the team's per-user budgets apply again")
    map_group = command(
        teams, "map-group", run_teams_map_group, "make members of an identity-provider group members of a team"
    )
    map_group.add_argument("name", metavar="TEAM")
    map_group.add_argument("group", metavar="GROUP", help="the group as the provider's groups claim names it")
    map_group.add_argument("--remove", action="store_true", help="the group's members no longer belong to the team")
    team_list = command(teams, "list", run_teams_list, "list teams with their spend this period")
    team_list.add_argument("--format", choices=("table", "json"), default="table")

    keys = group("keys", "manage client keys")
    key_create = command(keys, "create", run_keys_create, "create a client key (printed once, on the last line)")
    key_create.add_argument("--team", required=True)
    key_create.add_argument("--name", help="a label for the key")
    key_create.add_argument("--budget", metavar="USD", help="the key's own spend limit per period")
    key_create.add_argument("--period", choices=PERIODS, default="month")
    _window_options(key_create, "the key's own")
    key_create.add_argument(
        "--expires", metavar="DAYS|never", default="never", help="days until the key stops working (default: never)"
    )
    key_create.add_argument("--format", choices=("text", "json"), default="text")
    _rate_options(key_create, "the key's own")
    key_update = command(
        keys, "update", run_keys_update, "change a key's budgets and rate limits (options not given stay)"
    )
    key_update.add_argument("key_id")
    key_update.add_argument("--budget", metavar="USD", help="the key's own spend limit per period; 'none' for none")
    key_update.add_argument("--period", choices=PERIODS, help="the period of --budget (moves it when given alone)")
    _window_options(key_update, "the key's own")
    _rate_options(key_update, "the key's own")
    key_revoke = command(keys, "revoke", run_keys_revoke, "revoke a key")
    key_revoke.add_argument("key_id")
    key_rotate = command(
        keys,
        "rotate",
        run_keys_rotate,
        "replace a key with a new one (printed once, on the last line); the old is revoked",
    )
    key_rotate.add_argument("key_id")
    key_rotate.add_argument("--format", choices=("text", "json"), default="text")
    key_list = command(keys, "list", run_keys_list, "list keys (never the keys themselves)")
    key_list.add_argument("--team")
    key_list.add_argument("--owner", metavar="SUBJECT", help="only this person's keys (oidc:<sub>)")
    key_list.add_argument("--format", choices=("table", "json"), default="table")

    login = command(
        commands,
        "login",
        run_login,
        "get a personal key by signing in through the browser (device code); stored in SPENDGATE_CREDENTIALS",
        db=False,
    )
    login.add_argument("--url", required=True, help="the spendgate server, as its dashboard is reached")
    helper = command(
        commands,
        "key-helper",
        run_key_helper,
        "print the stored personal key, renewed first when about to expire (Claude Code's apiKeyHelper)",
        db=False,
    )
    helper.add_argument(
        "--renew-before",
        metavar="SECONDS",
        type=float,
        help="renew when less than this is left (default: 7 days, or half the key's lifetime if shorter)",
    )

    usage = command(commands, "usage", run_usage, "print usage records, oldest first")
    usage.add_argument("--team")
    usage.add_argument(
        "--session", help="only the calls of this session (x-claude-code-session-id, x-spendgate-session)"
    )
    usage.add_argument("--since", metavar="ISO8601")
    usage.add_argument("--until", metavar="ISO8601")
    usage.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")

    report_command = command(commands, "report", run_report, "totals of calls, tokens, cost and retry cost, grouped")
    report_command.add_argument("--by", metavar="FIELD,FIELD", help=f"group by any of {','.join(GROUPS)}")
    report_command.add_argument("--since", metavar="ISO8601")
    report_command.add_argument("--until", metavar="ISO8601")
    report_command.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report_command.add_argument(
        "--limit", metavar="N", help="at most N groups (a page); the next page's --cursor goes to stderr"
    )
    report_command.add_argument("--cursor", help="the page after the one that printed it (same --by, --since, --until)")

    audit = group("audit", "the tamper-evident audit trail")
    command(audit, "verify", run_audit_verify, "check the hash chain of usage records and admin events")
    audit_export = command(audit, "export", run_audit_export, "print admin events as JSON lines, oldest first")
    audit_export.add_argument("--since", metavar="ISO8601")

    reprice_command = command(
        commands, "reprice", run_reprice, "recompute stored costs with the current price table (originals are kept)"
    )
    reprice_command.add_argument("--since", metavar="ISO8601", required=True)
    reprice_command.add_argument("--until", metavar="ISO8601")

    rollups = group("rollups", "usage totals by day and group, which reports and the dashboard read")
    command(rollups, "rebuild", run_rollups_rebuild, "recompute the rollups from the records (pruned days are kept)")

    prune_command = command(
        commands,
        "prune",
        run_prune,
        "export usage records older than a horizon to a file, then delete them (rollups and the audit chain's "
        "checkpoint are kept)",
    )
    prune_command.add_argument(
        "--before", metavar="DATE", help="the horizon, a UTC date (default: today - SPENDGATE_RETENTION_DAYS)"
    )
    prune_command.add_argument(
        "--export", metavar="PATH", required=True, help="a new file for the records (.gz: gzipped); never overwritten"
    )
    prune_command.add_argument("--format", choices=("jsonl", "csv"), help="default: from PATH (.csv), else jsonl")

    journal = group("journal", "crash journals and spilled records")
    journal_replay = command(
        journal,
        "replay",
        run_journal_replay,
        "write to the ledger what processes that are gone left in DIR: journals (unfinished calls become "
        "'interrupted' records at their worst case), spill files, and records set aside as refused",
    )
    journal_replay.add_argument("directory", metavar="DIR")

    reconcile_command = command(
        commands,
        "reconcile",
        run_reconcile,
        "compare the ledger with Anthropic's usage and cost reports (SPENDGATE_ANTHROPIC_ADMIN_KEY); exit 4 on drift",
    )
    reconcile_command.add_argument("--since", metavar="ISO8601", required=True)
    reconcile_command.add_argument("--until", metavar="ISO8601", required=True)
    reconcile_command.add_argument("--by", choices=("hour", "day"), default="day", help="token buckets (cost: daily)")
    tolerance = _default("SPENDGATE_RECONCILE_TOLERANCE", defaults.reconcile_tolerance)
    reconcile_command.add_argument("--tolerance", metavar="USD", help=f"cost difference that is not drift {tolerance}")
    reconcile_command.add_argument("--format", choices=("table", "json", "csv"), default="table")

    prices = command(commands, "prices", run_prices, "show the price table in force", db=False)
    prices.add_argument("--model")
    prices.add_argument("--format", choices=("text", "json"), default="text")
    check = command(
        prices.add_subparsers(metavar="COMMAND"),
        "check",
        run_prices_check,
        "list models in the ledger priced by a family fallback or not at all (exit 4 if any: the table is stale)",
    )
    check.add_argument("--since", metavar="ISO8601")
    check.add_argument("--until", metavar="ISO8601")
    check.add_argument("--format", choices=("table", "json"), default="table")
    return parser


def _default(variable: str, value: object) -> str:
    """How every option's help names the environment variable it overrides, and the default without either."""
    return f"(default: ${variable}, else {value})"


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1 to 65535)")
    return int(text)


def _rate_options(parser: argparse.ArgumentParser, whose: str) -> None:
    for name, what in zip(
        RATE_OPTIONS, ("requests", "input tokens (uncached and cache writes)", "output tokens"), strict=True
    ):
        parser.add_argument(f"--{name}", metavar="N", help=f"{whose} {what} per minute; 'none' for no limit")


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


def _window_options(sub: argparse.ArgumentParser, whose: str, *, prefix: str = "") -> None:
    """`--daily-budget`, `--weekly-budget`, `--monthly-budget` (after `prefix`): budget windows held at once."""
    for period in WINDOW_PERIODS:
        sub.add_argument(
            f"--{prefix}{WINDOW_NAMES[period]}-budget",
            metavar="USD",
            help=f"{whose} spend limit per calendar {period} (UTC), besides the others; 'none' to remove it",
        )
