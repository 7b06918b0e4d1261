"""Claude Code fleets through spendgate: the real Claude Code (the version tests/clients pins) in print mode, and the
official SDK where Claude Code's requests are best checked at the HTTP level.

What Claude Code 2.1.197 sends, as observed at spendgate and at the fake upstream:
- `HEAD /` as it starts (no credentials), then one streamed `POST /v1/messages?beta=true` per model turn (one for
  "say hi"), with its key as `Authorization: Bearer` (from `ANTHROPIC_AUTH_TOKEN`; `ANTHROPIC_API_KEY` sends
  `x-api-key`), `x-claude-code-session-id`, `anthropic-beta` (a list of eight betas) and `metadata.user_id` a JSON
  string `{"device_id": …, "account_uuid": "", "session_id": …}` whose session is the header's;
- with `CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1`, unless nonessential traffic is disabled, also
  `GET /v1/models?limit=1000` (Bearer, `anthropic-version`, no session header), whose `claude*` ids it keeps in
  `~/.claude/cache/gateway-models.json` for its model picker;
- a 402 `billing_error` is printed as `API Error: 402 <message>`, exit status 1, and not retried.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
from sqlalchemy import Engine

from proxy.ledger.teams import TeamSettings
from proxy.pricing.table import PriceTable
from tests.claude_code import claude_code_stack
from tests.replicas import free_port
from tests.stack import Stack, running_stack

# The team's allow-list: two models the upstream serves, one it does not.
ALLOWED = ("claude-sonnet-4-6", "claude-haiku-4-5-20251001", "claude-retired-1")
SERVED_AND_ALLOWED = ["claude-sonnet-4-6", "claude-haiku-4-5-20251001"]


def sdk(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0)


def test_a_prompt_through_spendgate(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """One run covers the probe, model discovery, and the records of the Messages calls."""
    with claude_code_stack(engine, db_url, tmp_path, team=TeamSettings(models=ALLOWED)) as stack:
        ran = stack.run("say hi", model="claude-sonnet-4-6", discovery=True)
        assert ran.returncode == 0, ran.output
        probe, listing, *calls = stack.heard
        # The start-up probe is answered, not refused.
        assert (probe.method, probe.path, probe.status, probe.body) == ("HEAD", "/", 200, b"")
        # Model discovery shows the team's models that the upstream serves, and Claude Code keeps them.
        assert (listing.method, listing.path, listing.query, listing.status) == ("GET", "/v1/models", "limit=1000", 200)
        assert listing.headers["authorization"] == f"Bearer {stack.key}"
        shown = listing.json()
        assert [model["id"] for model in shown["data"]] == SERVED_AND_ALLOWED
        assert (shown["has_more"], shown["first_id"], shown["last_id"]) == (False, *SERVED_AND_ALLOWED)
        assert ran.discovered() == SERVED_AND_ALLOWED
        # Every Messages call went upstream once, its query kept, and has one record named by its path alone.
        assert calls and {(call.method, call.path, call.query, call.status) for call in calls} == {
            ("POST", "/v1/messages", "beta=true", 200)
        }
        sent = [request for request in stack.upstream.requests if request.path == "/v1/messages"]
        assert [request.query for request in sent] == ["beta=true"] * len(calls)
        stack.idle()
        records = stack.records(len(sent) + 1)
        messages = [record for record in records if record["endpoint"] == "/v1/messages"]
        assert len(messages) == len(sent) and len(records) == len(sent) + 1
        assert {(record["status"], record["outcome"], record["model"]) for record in messages} == {
            (200, "ok", "claude-sonnet-4-6")
        }
        [listed] = [record for record in records if record["endpoint"] == "/v1/models"]
        assert (listed["status"], listed["outcome"], listed["cost_usd"]) == (200, "ok", None)
        # The run is one session, Claude Code's own, and its user the stable part of its metadata, not the blob.
        assert {record["session"] for record in messages} == {sent[0].headers["x-claude-code-session-id"]}
        [user] = {record["user"] for record in messages}
        assert user and not user.startswith("{")


def test_a_daily_window_refusal_is_shown_with_its_reset_and_not_retried(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    team = TeamSettings(budget_usd=Decimal(100), windows={"day": Decimal("0.000001")})
    with claude_code_stack(engine, db_url, tmp_path, team=team) as stack:
        ran = stack.run("say hi", model="claude-sonnet-4-6")
        assert ran.returncode != 0
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z")
        assert "API Error: 402" in ran.output and f"(daily; resets {tomorrow})" in ran.output
        refused = [heard for heard in stack.heard if heard.path == "/v1/messages"]
        assert [(heard.status, heard.json()["error"]["type"]) for heard in refused] == [(402, "billing_error")]
        assert [request for request in stack.upstream.requests if request.path == "/v1/messages"] == []
        stack.idle()
        [record] = stack.records(1)
        assert (record["status"], record["outcome"], record["error_type"]) == (402, "rejected", "budget_exceeded")


def test_a_clamp_at_the_budget_edge_lets_claude_code_answer(engine: Engine, db_url: str, tmp_path: Path) -> None:
    # Claude Code asks Sonnet 4.6 for 32,000 output tokens ($0.48) with a ~76 KB body (~$0.29 at the dearest input
    # rate): $0.60 a day cannot hold that worst case, but holds one with fewer output tokens.
    team = TeamSettings(windows={"day": Decimal("0.60")}, budget_edge="clamp")
    with claude_code_stack(engine, db_url, tmp_path, team=team) as stack:
        ran = stack.run("say hi", model="claude-sonnet-4-6")
        assert ran.returncode == 0, ran.output
        sent = [json.loads(request.body) for request in stack.upstream.requests if request.path == "/v1/messages"]
        stack.idle()
        records = stack.records(len(sent))
        assert sent and [record["max_tokens_sent"] for record in records] == [body["max_tokens"] for body in sent]
        assert all(1_024 <= record["max_tokens_sent"] < record["max_tokens_requested"] for record in records)


def test_the_start_up_probe_is_answered_without_a_key(stack: Stack) -> None:
    for headers in ({}, {"authorization": "Bearer sk-sg-not-a-key"}):
        probe = httpx.head(stack.url + "/", headers=headers)
        assert (probe.status_code, probe.headers["content-length"], probe.content) == (200, "0", b"")
    # Only the probe: any other request for / is still not found.
    missing = httpx.get(stack.url + "/")
    assert (missing.status_code, missing.json()["error"]["type"]) == (404, "not_found_error")
    assert stack.upstream.requests == []
    stack.idle()
    assert stack.count() == 0


def test_model_discovery_lists_only_the_models_a_key_may_use(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(models=ALLOWED)) as stack, sdk(stack) as client:
        assert [model.id for model in client.models.list()] == SERVED_AND_ALLOWED
        # A page at a time, the cursors lead through the same list.
        first = client.models.list(limit=1)
        assert ([model.id for model in first.data], first.has_more) == (SERVED_AND_ALLOWED[:1], True)
        assert first.first_id == first.last_id == SERVED_AND_ALLOWED[0]
        assert [model.id for model in client.models.list(limit=1)] == SERVED_AND_ALLOWED
        # The upstream is asked for its whole catalogue every time, and spendgate pages the team's part of it.
        asked = [request.query for request in stack.upstream.requests]
        assert asked == ["limit=1000"] * 4


def test_model_discovery_without_the_upstream(engine: Engine, db_url: str, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    team = TeamSettings(models=ALLOWED)
    with running_stack(engine, db_url, tmp_path, team=team, upstream_url=down) as stack, sdk(stack) as client:
        listed = client.models.list()
        # What spendgate knows: the allow-list, newest generation first, named after the ids and dated by them.
        assert [(model.id, model.display_name, model.created_at.date().isoformat()) for model in listed] == [
            ("claude-sonnet-4-6", "Claude Sonnet 4.6", "1970-01-01"),
            ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01"),
            ("claude-retired-1", "Claude Retired 1", "1970-01-01"),
        ]
        [record] = stack.records(1)
        assert (record["status"], record["outcome"], record["error_type"]) == (
            200,
            "upstream_unreachable",
            "upstream_unreachable",
        )
        assert record["cost_usd"] is None


def test_model_discovery_without_the_upstream_or_an_allow_list(engine: Engine, db_url: str, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    with running_stack(engine, db_url, tmp_path, upstream_url=down) as stack, sdk(stack) as client:
        listed = client.models.list(limit=1000)
        # The models of the price table in force.
        assert sorted(model.id for model in listed.data) == PriceTable.load().models(datetime.now(UTC))
        assert listed.has_more is False and listed.first_id == listed.data[0].id
        assert all(model.display_name.startswith("Claude ") for model in listed.data)
        [record] = stack.records(1)
        assert (record["status"], record["outcome"]) == (200, "upstream_unreachable")
