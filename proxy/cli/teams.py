"""`spendgate teams` and `spendgate keys`: teams, their end users' budgets, and client keys."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from proxy.cli.database import actor, open_ledger
from proxy.cli.errors import UsageError
from proxy.cli.output import money_shown, print_table, windows_shown
from proxy.cli.values import RATE_OPTIONS, given, money, positive_int, windows_given
from proxy.config import Settings
from proxy.types import RateLimits

if TYPE_CHECKING:
    from proxy.ledger.teams import TeamSettings


def run_teams_create(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate teams create`."""
    from proxy.ledger.teams import create_team

    with open_ledger(settings) as engine:
        view = create_team(engine, args.name, _team_settings(args), actor=actor())
    print(json.dumps(view.to_json()))
    return 0


def run_teams_update(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate teams update`."""
    from proxy.ledger.teams import update_team

    with open_ledger(settings) as engine:
        view = update_team(engine, args.name, _team_settings(args), actor=actor())
    print(json.dumps(view.to_json()))
    return 0


def run_teams_list(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate teams list`."""
    from proxy.ledger.teams import list_teams

    with open_ledger(settings) as engine:
        views = [view.to_json() for view in list_teams(engine)]
    if args.format == "json":
        print(json.dumps(views, indent=2))
        return 0
    columns = ("name", "budget_usd", "period", "spent_usd", "held_usd", "remaining_usd", "windows", "max_output_tokens")
    print_table(columns, [{**view, "windows": windows_shown(view["windows"])} for view in money_shown(views)])
    return 0


def run_teams_users(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate teams users`."""
    from proxy.ledger.end_users import list_users

    with open_ledger(settings) as engine:
        views = [view.to_json() for view in list_users(engine, args.name)]
    if args.format == "json":
        print(json.dumps(views, indent=2))
        return 0
    columns = ("user", "budget_usd", "own_budget", "spent_usd", "held_usd", "remaining_usd", "windows")
    print_table(columns, [{**view, "windows": windows_shown(view["windows"])} for view in money_shown(views)])
    return 0


def run_teams_user_budget(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate teams user-budget`."""
    from proxy.ledger.end_users import set_user_budget
    from proxy.ledger.windows import WindowChange

    windows = windows_given(args)
    if (args.budget is None and windows is None) == (not args.clear):
        raise UsageError("give --budget USD (or 'none'), window budgets (--daily-budget USD, ...), or --clear")
    change = None if args.clear else WindowChange(budget=given(args.budget, money), windows=windows)
    with open_ledger(settings) as engine:
        view = set_user_budget(engine, args.name, args.user, change, actor=actor())
    print(json.dumps(view.to_json()))
    return 0


def run_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate keys create`: the key is printed once, alone on the last line."""
    from proxy.ledger.key_admin import create_key

    with open_ledger(settings) as engine:
        view, key = create_key(
            engine,
            args.team,
            actor=actor(),
            name=args.name,
            budget_usd=money(args.budget) if args.budget is not None else None,
            period=args.period,
            windows=windows_given(args),
            rates=RateLimits(**{name: given(getattr(args, name) or "none", positive_int) for name in RATE_OPTIONS}),
            expires_days=None if args.expires.lower() in ("never", "none") else positive_int(args.expires),
        )
    return _show_new_key(args, view.to_json(), key, "created")


def run_keys_rotate(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate keys rotate`: the new key is printed once, alone on the last line."""
    from proxy.ledger.key_admin import rotate_key

    with open_ledger(settings) as engine:
        view, key = rotate_key(engine, args.key_id, actor=actor())
    return _show_new_key(args, view.to_json(), key, f"rotated {args.key_id} (now revoked) into")


def _show_new_key(args: argparse.Namespace, view: dict[str, object], key: str, what: str) -> int:
    if args.format == "json":
        print(json.dumps({**view, "key": key}))
        return 0
    expires = f", expires {view['expires_at']}" if view["expires_at"] else ""
    print(f"{what} key {view['id']} for team {view['team']}{expires} (shown once; store it now):")
    print(key)
    return 0


def run_teams_map_group(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate teams map-group TEAM GROUP [--remove]`."""
    from proxy.ledger.groups import map_group

    with open_ledger(settings) as engine:
        groups = map_group(engine, args.name, args.group, actor=actor(), remove=args.remove)
    print(json.dumps({"team": args.name, "groups": groups}))
    return 0


def run_keys_update(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate keys update`."""
    from proxy.ledger.key_admin import update_key
    from proxy.ledger.windows import WindowChange
    from proxy.types import UNSET

    changes = {name: given(getattr(args, name), positive_int) for name in RATE_OPTIONS}
    budget = WindowChange(
        budget=given(args.budget, money),
        period=args.period if args.period is not None else UNSET,
        windows=windows_given(args),
    )
    with open_ledger(settings) as engine:
        view = update_key(engine, args.key_id, actor=actor(), budget=None if budget.empty else budget, **changes)
    print(json.dumps(view.to_json()))
    return 0


def run_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate keys revoke`."""
    from proxy.ledger.key_admin import revoke_key

    with open_ledger(settings) as engine:
        view = revoke_key(engine, args.key_id, actor=actor())
    print(f"revoked key {view.id} of team {view.team}")
    return 0


def run_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate keys list`."""
    from proxy.ledger.key_admin import list_keys

    with open_ledger(settings) as engine:
        views = [view.to_json() for view in list_keys(engine, team=args.team, owner=args.owner)]
    if args.format == "json":
        print(json.dumps(views, indent=2))
    else:
        columns = ("id", "team", "name", "key_owner", "prefix", "budget_usd", "period", "expires_at", "revoked_at")
        print_table(columns, money_shown(views))
    return 0


def _team_settings(args: argparse.Namespace) -> TeamSettings:
    from proxy.ledger.teams import TeamSettings
    from proxy.types import UNSET

    return TeamSettings(
        budget_usd=given(args.budget, money),
        period=args.period if args.period is not None else UNSET,
        max_output_tokens=given(args.max_output_tokens, positive_int),
        cap_policy=args.cap_policy if args.cap_policy is not None else UNSET,
        models=given(args.models, _models),
        retry_window_seconds=_seconds(args.retry_window) if args.retry_window is not None else UNSET,
        user_budget_usd=given(args.user_budget, money),
        windows=windows_given(args),
        user_windows=windows_given(args, "user_"),
        budget_edge=args.budget_edge if args.budget_edge is not None else UNSET,
        **{name: given(getattr(args, name), positive_int) for name in RATE_OPTIONS},
    )


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
