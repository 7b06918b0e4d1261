"""Claude Code fleets: each call's session and agents on its record (from Claude Code's headers and metadata, or
`x-spendgate-session`), its user the stable part of Claude Code's metadata, and spend by session in reports,
exports and the admin API; the journal keeps them through a crash."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine, select, update

from proxy.cli.main import main
from proxy.gateway.call import label
from proxy.gateway.claude_code import ClaudeCodeUserId, parse_user_id
from proxy.ledger.audit import verify
from proxy.ledger.commit import insert_records
from proxy.ledger.export import iter_usage, public_record
from proxy.ledger.groups import map_group
from proxy.ledger.journal import Journal, Start
from proxy.ledger.journal_replay import replay_journal
from proxy.ledger.key_admin import create_key
from proxy.ledger.people import PersonView, record_sign_in
from proxy.ledger.reports import report, top_sessions
from proxy.ledger.schema import UsageRow
from proxy.pricing.table import PriceTable
from proxy.types import Usage
from tests.claude_code import CLAUDE_CODE_QUIET, claude_code
from tests.stack import Stack, running_stack
from tests.test_writer import make_record
from tests.waiting import wait_until

TOKEN = "sessions-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MESSAGE: dict[str, Any] = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "Hi"}],
}
CLAUDE_CODE_HEADERS = {
    "x-claude-code-session-id": "2f8b6a83-b2e2-455f-af2c-eba8af7f4dcc",
    "x-claude-code-agent-id": "agent-explore-7",
    "x-claude-code-parent-agent-id": "agent-main",
}
DEVICE = "9800acc182a5c1dd7eb76ca49cfc6ec10aacc747b78b6c7730934d8d54a38aa1"


def blob(session: str, *, account: str = "", device: str = DEVICE) -> str:
    """A `metadata.user_id` as Claude Code sends it."""
    return json.dumps({"device_id": device, "account_uuid": account, "session_id": session}, separators=(",", ":"))


@pytest.fixture
def served(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[Stack]:
    """The stack with the admin API on."""
    with running_stack(engine, db_url, tmp_path, admin_token=TOKEN) as stack:
        yield stack


def post(stack: Stack, *, key: str | None = None, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    """One Messages call, as raw HTTP (the body exactly as given, lone surrogates escaped)."""
    content = json.dumps({**MESSAGE, **body}).encode()
    sent = {"x-api-key": key or stack.key, "content-type": "application/json", **(headers or {})}
    return httpx.post(f"{stack.url}/v1/messages", content=content, headers=sent, timeout=30)


def record_of(stack: Stack, answer: httpx.Response) -> dict[str, Any]:
    """The usage record of the call that got `answer`, once it is in the ledger."""
    call_id = answer.headers["x-spendgate-request-id"]

    def found() -> Any:
        with stack.engine.connect() as connection:
            return connection.execute(select(*UsageRow.__table__.columns).where(UsageRow.id == call_id)).first()

    return public_record(wait_until(found, f"the record of {call_id}"))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_claude_codes_headers_name_the_session_and_agents(served: Stack, stream: bool) -> None:
    answer = post(served, headers=CLAUDE_CODE_HEADERS, stream=stream)
    assert answer.status_code == 200
    record = record_of(served, answer)
    assert (record["session"], record["agent"], record["parent_agent"]) == (
        "2f8b6a83-b2e2-455f-af2c-eba8af7f4dcc",
        "agent-explore-7",
        "agent-main",
    )
    assert (record["streamed"], record["outcome"]) == (stream, "ok")
    # Claude Code's own headers are the upstream's business too: forwarded as they came.
    seen = served.upstream.requests[-1].headers
    assert {name: seen[name] for name in CLAUDE_CODE_HEADERS} == CLAUDE_CODE_HEADERS


def test_x_spendgate_session_wins_and_stays_here(served: Stack) -> None:
    both = post(served, headers={**CLAUDE_CODE_HEADERS, "x-spendgate-session": "nightly-run-12"})
    seen = served.upstream.requests[-1].headers
    assert "x-spendgate-session" not in seen
    assert seen["x-claude-code-session-id"] == CLAUDE_CODE_HEADERS["x-claude-code-session-id"]
    alone = post(served, headers={"x-spendgate-session": "eval-3"}, stream=True)
    nothing = post(served)
    records = [record_of(served, answer) for answer in (both, alone, nothing)]
    assert [(record["session"], record["agent"]) for record in records] == [
        ("nightly-run-12", "agent-explore-7"),
        ("eval-3", None),
        (None, None),
    ]


def test_header_ids_are_bounded_and_made_safe(served: Stack) -> None:
    """Header bytes are whatever the client sent: not UTF-8, or longer than the column."""
    headers = [
        (b"x-api-key", served.key.encode()),
        (b"x-spendgate-session", b"caf\xe9-" + b"s" * 400),
        (b"x-claude-code-agent-id", b"\xff\xfe"),
    ]
    answer = httpx.post(f"{served.url}/v1/messages", json=MESSAGE, headers=headers, timeout=30)
    record = record_of(served, answer)
    assert record["session"] == ("caf\ufffd-" + "s" * 400)[:200]
    assert record["agent"] == "\ufffd\ufffd"


def test_claude_codes_metadata_names_a_stable_user_and_the_session(served: Stack) -> None:
    """The session part of Claude Code's `metadata.user_id` changes every session: the user is the stable part."""
    answers = [
        post(served, metadata={"user_id": blob("session-1", account="acct-ann")}),
        post(served, metadata={"user_id": blob("session-2", account="acct-ann")}, stream=True),
        # Signed in with an API key only, Claude Code sends an empty account: the device is the user.
        post(served, metadata={"user_id": blob("session-3")}),
        # A header names the session and the user over the body.
        post(
            served,
            metadata={"user_id": blob("session-4", account="acct-ann")},
            headers={"x-claude-code-session-id": "from-header", "x-spendgate-user": "bob"},
        ),
        # Any other user id is the user, as it always was.
        post(served, metadata={"user_id": "u-42"}),
        post(served, metadata={"user_id": '{"team":"x"}'}),
    ]
    records = [record_of(served, answer) for answer in answers]
    assert [(record["user"], record["session"]) for record in records] == [
        ("acct-ann", "session-1"),
        ("acct-ann", "session-2"),
        (DEVICE, "session-3"),
        ("bob", "from-header"),
        ("u-42", None),
        ('{"team":"x"}', None),
    ]


def test_a_shared_key_cannot_claim_a_person_through_claude_codes_metadata(served: Stack) -> None:
    answer = post(served, metadata={"user_id": blob("s", account="oidc:alice")})
    assert answer.status_code == 400
    assert "'oidc:' users are set by personal keys only" in answer.json()["error"]["message"]
    assert served.upstream.requests == []


def test_a_personal_keys_calls_stay_its_owners_and_take_the_session(served: Stack, engine: Engine) -> None:
    record_sign_in(engine, PersonView(subject="oidc:alice", email=None, name="Alice", groups=("research-staff",)))
    map_group(engine, "research", "research-staff", actor="test")
    _, personal = create_key(engine, "research", actor="test", owner="oidc:alice")
    answer = post(served, key=personal, metadata={"user_id": blob("session-9", account="acct-someone")})
    assert answer.status_code == 200
    record = record_of(served, answer)
    assert (record["user"], record["session"]) == ("oidc:alice", "session-9")


@pytest.mark.parametrize(
    "user_id, parsed",
    [
        (blob("s1", account="acct"), ClaudeCodeUserId(user="acct", session="s1")),
        (blob("s1"), ClaudeCodeUserId(user=DEVICE, session="s1")),
        ('{"account_uuid":"acct","session_id":""}', ClaudeCodeUserId(user="acct", session=None)),
        ('{"device_id":"","account_uuid":"","session_id":"s"}', ClaudeCodeUserId(user=None, session="s")),
        # Escapes are JSON's: what they decode to is made safe by `label` like any client text.
        ('{"device_id":"d\\u0000","session_id":"\\ud800"}', ClaudeCodeUserId(user="d\x00", session="\ud800")),
        ('{"device_id":"d","session_id":"s","extra":"x"}', ClaudeCodeUserId(user="d", session="s")),
        # Not Claude Code's: left to be the user as it is.
        ("u-42", None),
        ("", None),
        ("{", None),
        ('{"device_id":"d"}', None),
        ('{"session_id":"s"}', None),
        ('{"device_id":"d","session_id":5}', None),
        ('{"device_id":{"id":"d"},"session_id":"s"}', None),
        ('{"device_id":["d"],"session_id":"s"}', None),
        ('{"device_id":null,"session_id":"s"}', None),
        ('{"device_id":"d","session_id":"s"} trailing', None),
        ('{"device_id":"d\x00","session_id":"s"}', None),  # a raw control character: not JSON
        ('{"device_id":"d","session_id":"s","x":' + "[" * 400 + "]" * 400 + "}", None),
        ('["device_id","session_id"]', None),
        (' {"device_id":"d","session_id":"s"}', None),
        ('{"device_id":"' + "d" * 2000 + '","session_id":"s"}', None),
        ("{" * 100_000, None),
    ],
    ids=lambda value: repr(value)[:40] if isinstance(value, str) else "",
)
def test_only_claude_codes_own_user_id_is_taken_apart(user_id: str, parsed: ClaudeCodeUserId | None) -> None:
    assert parse_user_id(user_id) == parsed


# Claude Code's user ids with any ids in them, strings shaped like them (JSON objects of assorted keys and values),
# and any other text.
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_KEYS = st.sampled_from(["device_id", "account_uuid", "session_id"]) | st.text(max_size=10)
_CLAUDE_CODES = st.fixed_dictionaries(
    {"device_id": st.text(max_size=80), "account_uuid": st.text(max_size=80), "session_id": st.text(max_size=80)}
)
USER_IDS = (
    st.text(max_size=400) | st.dictionaries(_KEYS, _VALUES, max_size=4).map(json.dumps) | _CLAUDE_CODES.map(json.dumps)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user_id=USER_IDS)
def test_any_metadata_user_id_gives_a_safe_user_and_session(served: Stack, user_id: str) -> None:
    """Whatever the string: the call is answered (400 only for a claimed person); its record's user and session
    are storable labels: Claude Code's stable part and session, never its whole blob, or any other string as it is."""
    answer = post(served, metadata={"user_id": user_id})
    record = record_of(served, answer)
    user, session = record["user"], record["session"]
    assert user is None or ("\x00" not in user and len(user) <= 256 and label(user, 256) == user)
    assert session is None or ("\x00" not in session and len(session) <= 200 and label(session, 200) == session)
    parsed = parse_user_id(user_id)
    if parsed is None:
        assert (user, session) == (label(user_id, 256), None)
    else:
        assert user == (None if parsed.user is None else label(parsed.user, 256))
        assert session == (None if parsed.session is None else label(parsed.session, 200))
    expected = 400 if (user or "").startswith("oidc:") else 200
    assert answer.status_code == expected, answer.text


def test_real_claude_code_is_one_user_over_two_sessions(served: Stack, tmp_path: Path) -> None:
    """The Claude Code the tests pin, pointed at spendgate with a shared key, run twice (two sessions)."""
    home = tmp_path / "claude-home"
    home.mkdir()
    env = {
        **os.environ,
        **CLAUDE_CODE_QUIET,
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": served.url,
        "ANTHROPIC_API_KEY": served.key,
    }
    for _ in range(2):
        done = subprocess.run(
            [str(claude_code()), "-p", "say hi"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    served.idle()
    records = [r for _, r in iter_usage(served.engine) if r["endpoint"] == "/v1/messages"]
    sent = [request for request in served.upstream.requests if request.path == "/v1/messages"]
    assert len(records) == len(sent) >= 2
    # The session is the one Claude Code named (its header, forwarded as it came), and it changed between runs.
    sessions = [request.headers["x-claude-code-session-id"] for request in sent]
    assert [r["session"] for r in records] == sessions and len(set(sessions)) == 2
    # One user across both: the device, not the blob whose session part changed.
    [user] = {r["user"] for r in records}
    blobs = {json.loads(request.body)["metadata"]["user_id"] for request in sent}
    assert len(blobs) == 2 and user in {json.loads(b)["device_id"] for b in blobs} and user not in blobs


# Records of two teams' sessions and agents, for reports and exports.
START = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
LEDGER = [
    ("r1", "a", "s-1", "main", None, "ann", "0.5"),
    ("r2", "a", "s-1", "explore", "main", "ann", "0.25"),
    ("r3", "a", "s-2", "main", None, "bob", "1.125"),
    ("r4", "a", None, None, None, "bob", "2"),
    ("r5", "b", "s-1", "main", None, "cat", "0.0001"),
    ("r6", "a", "s-2", "main", None, "bob", None),
]


@pytest.fixture
def ledger(engine: Engine) -> Engine:
    insert_records(
        engine,
        [
            make_record(
                id=record_id,
                team=team,
                session=session,
                agent=agent,
                parent_agent=parent,
                user=user,
                started_at=START + timedelta(minutes=n),
                usage=Usage(input_tokens=10 * (n + 1), output_tokens=n),
                cost_usd=None if cost is None else Decimal(cost),
                price_source="table" if cost is not None else "unpriced",
            )
            for n, (record_id, team, session, agent, parent, user, cost) in enumerate(LEDGER)
        ],
    )
    return engine


def _sums(by: tuple[int, ...]) -> dict[tuple[str | None, ...], tuple[int, Decimal]]:
    """Calls and cost of `LEDGER` grouped by the fields at `by`, worked out here from the records themselves."""
    sums: dict[tuple[str | None, ...], tuple[int, Decimal]] = {}
    for row in LEDGER:
        group = tuple(row[i] for i in by)
        calls, cost = sums.get(group, (0, Decimal(0)))
        sums[group] = calls + 1, cost + Decimal(row[6] or 0)
    return sums


def test_report_by_session_and_agent_sums_the_records(
    ledger: Engine, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prices = PriceTable.load()
    by_session = {row.group["session"]: (row.calls, row.cost_usd) for row in report(ledger, prices, by=["session"])}
    assert by_session == {key[0]: value for key, value in _sums((2,)).items()}
    by_agent = {row.group["agent"]: (row.calls, row.cost_usd) for row in report(ledger, prices, by=["agent"])}
    assert by_agent == {key[0]: value for key, value in _sums((3,)).items()}
    # Per team and session, from the command line.
    assert main(["report", "--by", "team,session", "--format", "json", "--db", db_url]) == 0
    rows = json.loads(capsys.readouterr().out)
    found = {(r["team"], r["session"]): (r["calls"], Decimal(r["cost_usd"])) for r in rows}
    assert found == _sums((1, 2))
    assert main(["report", "--by", "session", "--db", db_url]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:2] == ["session", "calls"]


def test_a_teams_top_sessions(ledger: Engine) -> None:
    top = top_sessions(ledger, team="a", since=START, limit=10)
    assert [(s.session, s.user, s.calls, s.cost_usd) for s in top] == [
        ("s-2", "bob", 2, Decimal("1.125")),
        ("s-1", "ann", 2, Decimal("0.75")),
    ]
    assert top[0].last_seen == START + timedelta(minutes=5)
    assert [s.session for s in top_sessions(ledger, team="a", since=START, limit=1)] == ["s-2"]
    assert top_sessions(ledger, team="a", since=START + timedelta(days=1), limit=10) == []


def test_a_session_with_calls_of_nobody_is_not_one_persons(engine: Engine) -> None:
    later = START + timedelta(days=3)
    records = [
        make_record(id="sgr_ann", team="t", session="mixed", user="ann", started_at=later),
        make_record(id="sgr_nobody", team="t", session="mixed", user=None, started_at=later),
        make_record(id="sgr_anon", team="t", session="anonymous", user=None, started_at=later),
    ]
    insert_records(engine, records)
    top = {s.session: (s.user, s.users) for s in top_sessions(engine, team="t", since=later, limit=10)}
    assert top == {"mixed": (None, 2), "anonymous": (None, 1)}


def test_exports_and_the_admin_api_carry_the_fields(
    ledger: Engine, db_url: str, served: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["usage", "--format", "csv", "--db", db_url]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0].split(",")
    assert header[header.index("user") + 1 : header.index("user") + 4] == ["session", "agent", "parent_agent"]
    rows = list(csv.DictReader(io.StringIO(text)))
    expected = [(r[0], r[2] or "", r[3] or "", r[4] or "") for r in LEDGER]
    assert [(r["id"], r["session"], r["agent"], r["parent_agent"]) for r in rows] == expected
    # One session's calls alone.
    assert main(["usage", "--session", "s-1", "--db", db_url]) == 0
    session = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in session] == [r[0] for r in LEDGER if r[2] == "s-1"] != []
    assert main(["usage", "--format", "jsonl", "--db", db_url]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["session"], r["agent"], r["parent_agent"]) for r in lines] == [r[:1] + r[2:5] for r in LEDGER]
    page = httpx.get(f"{served.url}/admin/usage", params={"session": "s-1"}, headers=AUTH).json()
    assert [(r["id"], r["team"], r["parent_agent"]) for r in page["data"]] == [
        ("r1", "a", None),
        ("r2", "a", "main"),
        ("r5", "b", None),
    ]
    both = {"session": "s-1", "team": "a", "limit": "1"}
    first = httpx.get(f"{served.url}/admin/usage", params=both, headers=AUTH).json()
    after = {**both, "cursor": first["next_cursor"]}
    second = httpx.get(f"{served.url}/admin/usage", params=after, headers=AUTH).json()
    assert [r["id"] for r in first["data"] + second["data"]] == ["r1", "r2"] and not second["has_more"]
    grouped = httpx.get(f"{served.url}/admin/report", params={"by": "session,agent"}, headers=AUTH).json()["data"]
    found = {(r["session"], r["agent"]): (r["calls"], Decimal(r["cost_usd"])) for r in grouped}
    assert found == _sums((2, 3))
    refused = httpx.get(f"{served.url}/admin/report", params={"by": "parent"}, headers=AUTH)
    assert refused.status_code == 400 and "session, agent" in refused.text


def test_the_audit_chain_covers_sessions(ledger: Engine, db_url: str) -> None:
    assert verify(ledger).problem is None
    assert main(["audit", "verify", "--db", db_url]) == 0
    with ledger.begin() as connection:
        connection.execute(update(UsageRow).where(UsageRow.id == "r3").values(session="s-1"))
    problem = verify(ledger).problem
    assert problem is not None and "usage record r3) was edited" in problem


def test_a_replay_keeps_the_session_of_calls_ended_and_unfinished(engine: Engine, tmp_path: Path) -> None:
    """A process killed with one call ended (its record not yet in the ledger) and one still running."""
    journal = Journal(tmp_path, "dead")
    tags = {"session": "s-7", "agent": "explore", "parent_agent": "main"}
    for call_id in ("sgr_ended", "sgr_running"):
        journal.started(
            Start(
                id=call_id,
                started_at=START,
                team="research",
                key_id=None,
                feature=None,
                user="ann",
                endpoint="/v1/messages",
                model="claude-sonnet-4-6",
                streamed=True,
                max_tokens=100,
                input_bound=500,
                held=Decimal("0.01"),
                metered=True,
                **tags,
            )
        )
    journal.ended(make_record(id="sgr_ended", started_at=START, user="ann", **tags))
    replay_journal(engine, tmp_path, "dead", PriceTable.load(None), name="test")
    written = {r["id"]: r for _, r in iter_usage(engine)}
    assert {r["outcome"] for r in written.values()} == {"ok", "interrupted"}
    for record in written.values():
        assert {name: record[name] for name in tags} == tags
