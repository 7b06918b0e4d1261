"""The CLI's first hour: one-line errors that say what to do, and no surprises around pipes and Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from sqlalchemy import Engine

from proxy.cli.parser import build_parser
from proxy.ledger.commit import insert_records
from tests.replicas import free_port
from tests.test_writer import make_record

# The command line's words and exits: what the ledger is kept in plays no part.
pytestmark = pytest.mark.any_dialect
CLI = [sys.executable, "-m", "proxy.cli"]
README = Path(__file__).resolve().parent.parent / "README.md"


def spendgate(*argv: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "ANTHROPIC_"))}
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60, cwd=cwd, env={**environ, **env})


def test_a_missing_ledger_names_the_fix_and_creates_nothing(tmp_path: Path) -> None:
    ran = spendgate("teams", "list", cwd=tmp_path)
    assert ran.returncode == 1
    assert (
        ran.stderr.count("\n") == 1
        and "spendgate db upgrade" in ran.stderr
        and "sqlite:///./spendgate.db" in ran.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_an_unmigrated_ledger_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "empty.db").touch()
    ran = spendgate("--db", f"sqlite:///{tmp_path / 'empty.db'}", "usage")
    assert ran.returncode == 1
    assert "has no spendgate schema" in ran.stderr and "spendgate db upgrade" in ran.stderr
    assert "Traceback" not in ran.stderr and "SELECT" not in ran.stderr


def test_bad_and_unsupported_urls_are_one_line(tmp_path: Path) -> None:
    for url, words in (("notaurl", "is not a database URL"), ("mysql://u@h/db", "SQLite or PostgreSQL")):
        ran = spendgate("usage", "--db", url)
        assert ran.returncode == 1 and words in ran.stderr and ran.stderr.count("\n") == 1, ran.stderr


def test_db_goes_before_or_after_the_subcommand(db_url: str) -> None:
    assert spendgate("--db", db_url, "teams", "list").returncode == 0
    assert spendgate("teams", "list", "--db", db_url).returncode == 0


def test_a_group_without_its_command_prints_its_own_help() -> None:
    ran = spendgate("teams")
    assert ran.returncode == 2 and "usage: spendgate teams" in ran.stderr


def test_serve_refuses_to_start_without_an_upstream_key(db_url: str) -> None:
    ran = spendgate("serve", "--db", db_url, "--port", "1")
    assert ran.returncode == 1 and "ANTHROPIC_API_KEY is not set" in ran.stderr


def test_a_closed_pipe_ends_quietly(engine: Engine, db_url: str) -> None:
    insert_records(engine, [make_record(id=f"sgr_{n}") for n in range(3000)])
    ran = subprocess.run(
        ["bash", "-c", f'{" ".join(CLI)} usage --db "$1" | head -1; exit "${{PIPESTATUS[0]}}"', "bash", db_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (ran.returncode, ran.stderr) == (0, "")
    assert ran.stdout.count("\n") == 1


def test_ctrl_c_ends_quietly(engine: Engine, db_url: str) -> None:
    insert_records(engine, [make_record(id=f"sgr_{n}") for n in range(3000)])
    # A terminal's shell starts a command with Ctrl-C at its default. This suite may ignore it (a shell without job
    # control starts background commands so), and an ignored signal stays ignored in a child, whose export would
    # then rightly finish.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([*CLI, "usage", "--db", db_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, ignored)
    # Nobody reads its output past the first bytes, so it is blocked writing when the interrupt arrives.
    assert process.stdout is not None and process.stdout.read(1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.decode() == "spendgate: interrupted\n"


def test_help_imports_no_database_or_http_library() -> None:
    probe = (
        "import sys\n"
        "from proxy.cli.main import main\n"
        "for argv in (['--help'], ['teams', '--help'], ['serve', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'alembic', 'aiohttp', 'uvicorn'})\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in ran.stderr, ran.stderr


def test_typos_are_caught_where_they_are_typed(db_url: str) -> None:
    assert "not a TCP port" in spendgate("serve", "--port", "99999").stderr
    assert "not an http(s) base URL" in spendgate("prices", SPENDGATE_UPSTREAM_URL="notaurl").stderr
    assert "team name" in spendgate("teams", "create", "research team", "--db", db_url).stderr
    assert "team name" in spendgate("teams", "create", "a/b", "--db", db_url).stderr
    made = spendgate("teams", "create", "research", "--models", "claude-sonet-4-6", "--db", db_url)
    assert made.returncode == 0 and "not in the price table" in made.stderr
    missing = spendgate("keys", "list", "--team", "nosuchteam", "--db", db_url)
    assert missing.returncode == 1 and "nosuchteam" in missing.stderr


def test_keys_create_speaks_json_too(db_url: str) -> None:
    assert spendgate("teams", "create", "research", "--db", db_url).returncode == 0
    made = spendgate("keys", "create", "--team", "research", "--format", "json", "--db", db_url)
    created = json.loads(made.stdout)
    assert created["key"].startswith("sk-sg-") and created["team"] == "research"


def test_long_commands_show_progress_on_a_terminal_only(engine: Engine, db_url: str) -> None:
    insert_records(engine, [make_record(id=f"sgr_{n}") for n in range(5000)])
    primary, secondary = pty.openpty()
    try:
        on_terminal = subprocess.run(
            [*CLI, "audit", "verify", "--db", db_url], stdout=subprocess.PIPE, stderr=secondary, timeout=120
        )
        os.close(secondary)
        shown = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(primary, 65536):
                shown += chunk
    finally:
        os.close(primary)
    assert on_terminal.returncode == 0 and b"verifying the audit chain" in shown
    in_a_pipe = spendgate("audit", "verify", "--db", db_url)
    assert in_a_pipe.returncode == 0 and in_a_pipe.stderr == ""


def test_prices_speak_json_too() -> None:
    table = json.loads(spendgate("prices", "--format", "json").stdout)
    assert table["version"] and any(model["model"] == "claude-sonnet-4-6" for model in table["models"])
    [sonnet] = json.loads(spendgate("prices", "--format", "json", "--model", "claude-sonnet-4-6").stdout)["models"]
    assert (sonnet["standard"]["input"], sonnet["standard"]["output"]) == ("3", "15")
    assert json.loads(spendgate("prices", "--format", "json", "--model", "gpt-4").stdout)["models"] == []


def test_serve_on_a_port_in_use_says_so_before_touching_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = spendgate("serve", "--port", str(port), cwd=tmp_path, ANTHROPIC_API_KEY="sk-ant-test")
    assert ran.returncode == 1 and ran.stderr.count("\n") == 1, ran.stderr
    assert f"port {port}" in ran.stderr and "already in use" in ran.stderr and "--port" in ran.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_team_gets_the_close_name(db_url: str) -> None:
    assert spendgate("teams", "create", "research", "--db", db_url).returncode == 0
    for argv in (
        ("keys", "create", "--team", "reserch"),
        ("keys", "list", "--team", "reserch"),
        ("teams", "update", "reserch", "--budget", "10"),
        ("teams", "users", "reserch"),
        ("teams", "user-budget", "reserch", "ann", "--budget", "1"),
        ("usage", "--team", "reserch"),
    ):
        ran = spendgate(*argv, "--db", db_url)
        assert ran.returncode == 1 and ran.stderr.count("\n") == 1, (argv, ran.stderr)
        assert "no team named 'reserch' (did you mean 'research'?)" in ran.stderr, (argv, ran.stderr)
    # Still the way to a new team, for who meant one; and no guess when nothing is close.
    assert "spendgate teams create reserch" in spendgate("keys", "create", "--team", "reserch", "--db", db_url).stderr
    far = spendgate("keys", "create", "--team", "marketing", "--db", db_url).stderr
    assert "did you mean" not in far and "spendgate teams create marketing" in far


def test_usage_of_an_unknown_team_is_an_error(db_url: str) -> None:
    ran = spendgate("usage", "--team", "nosuch", "--db", db_url)
    assert (ran.returncode, ran.stdout) == (1, "")
    assert ran.stderr == "spendgate: no team named 'nosuch'\n"
    assert spendgate("teams", "create", "research", "--db", db_url).returncode == 0
    assert spendgate("usage", "--team", "research", "--format", "csv", "--db", db_url).returncode == 0


def test_a_ledger_that_cannot_be_opened_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    stopped = f"postgresql://spendgate:s3cret@127.0.0.1:{free_port()}/ledger"
    for url, shown, cause in (
        (f"sqlite:///{missing}/x.db", f"sqlite:///{missing}/x.db", f"folder {missing} does not exist"),
        (stopped, stopped.replace("s3cret", "***"), "refused"),
    ):
        for argv in (
            ("db", "upgrade"),
            ("serve", "--port", str(free_port())),
            ("teams", "list"),
            ("keys", "create", "--team", "research"),
            ("usage",),
        ):
            ran = spendgate(*argv, "--db", url, cwd=tmp_path, ANTHROPIC_API_KEY="sk-ant-test")
            assert ran.returncode == 1 and ran.stderr.count("\n") == 1, (argv, ran.stderr)
            assert f"the ledger at {shown}" in ran.stderr and cause in ran.stderr, (argv, ran.stderr)
            assert "s3cret" not in ran.stderr and "Traceback" not in ran.stderr
    assert not missing.exists()


def test_flags_name_their_environment_variables() -> None:
    # The README's configuration table pairs variables with flags: "`SPENDGATE_HOST`, ... (`--host`, ...)".
    rows = re.findall(r"^\| ((?:`\w+`(?:, )?)+) \(((?:`--[\w-]+`(?:, )?)+)\) \|", README.read_text(), re.M)
    paired = {
        flag: variable
        for variables, flags in rows
        for variable, flag in zip(re.findall(r"`(\w+)`", variables), re.findall(r"`(--[\w-]+)`", flags), strict=True)
    }
    assert paired["--upstream"] == "SPENDGATE_UPSTREAM_URL"
    helps = _option_helps(build_parser())
    assert helps, "no options found"
    for command, flag, text in helps:
        named = set(re.findall(r"\$(\w+)", text))
        if flag in paired:
            assert named == {paired[flag]}, (command, flag, text)
        else:
            assert not named, f"{command} {flag} names {named}: list it in the README's configuration table"
    served = spendgate("serve", "--help").stdout
    assert all(f"${name}" in served for name in ("SPENDGATE_UPSTREAM_URL", "SPENDGATE_PORT", "SPENDGATE_DB_URL"))


def _option_helps(parser: argparse.ArgumentParser, command: str = "spendgate") -> list[tuple[str, str, str]]:
    """(command, flag, help) of every option of `parser` and its subcommands."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _option_helps(sub, f"{command} {name}")
        found += [(command, flag, action.help or "") for flag in action.option_strings if flag.startswith("--")]
    return found


def test_version_comes_from_the_package_metadata() -> None:
    ran = spendgate("--version")
    assert (ran.returncode, ran.stdout) == (0, f"spendgate {version('spendgate')}\n")
