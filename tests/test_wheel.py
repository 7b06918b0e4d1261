"""The wheel, not the source tree: every package of `proxy/` ships, and `spendgate serve` runs from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
from sqlalchemy import Engine

from proxy.ledger.key_admin import create_key
from proxy.ledger.teams import TeamSettings, create_team
from tests.replicas import replica
from tests.servers import serve_in_thread
from tests.upstream import FakeAnthropic

ROOT = Path(__file__).resolve().parent.parent
# What a working tree holds beside its tracked files.
UNTRACKED = (
    "build",
    "dist",
    "*.egg-info",
    ".venv",
    ".git",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "*.db",
    ".coverage*",
)


def test_the_installed_wheel_serves(engine: Engine, db_url: str, tmp_path: Path) -> None:
    # Built from a copy without build artefacts: setuptools reuses a stale `build/` of the tree, and shipped modules
    # deleted from the source long ago beside the new ones.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*UNTRACKED))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    [wheel] = tmp_path.glob("spendgate-*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    packages = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "proxy").rglob("__init__.py")}
    shipped = {str(p.parent.relative_to(unpacked)).replace("/", ".") for p in unpacked.rglob("__init__.py")}
    assert packages <= shipped
    modules = {p.relative_to(ROOT) for p in (ROOT / "proxy").rglob("*.py")}
    in_wheel = {p.relative_to(unpacked) for p in (unpacked / "proxy").rglob("*.py")}
    assert {p for p in in_wheel if p.parts[1] != "migrations"} == modules
    assert (unpacked / "proxy" / "pricing" / "prices.toml").is_file()
    assert (unpacked / "proxy" / "gateway" / "output_limits.toml").is_file()
    # The dashboard's templates and stylesheet: everything its pages load ships in the wheel.
    dashboard = ROOT / "proxy" / "surfaces" / "dashboard"
    assets = {p.relative_to(dashboard) for p in [*dashboard.glob("templates/*"), *dashboard.glob("static/*")]}
    assert assets and all((unpacked / "proxy" / "surfaces" / "dashboard" / asset).is_file() for asset in assets)

    create_team(engine, "research", TeamSettings(), actor="test")
    _, key = create_key(engine, "research", actor="test")
    # Run from elsewhere, with the unpacked wheel first on the path: the source tree cannot stand in for it.
    env = {"PYTHONPATH": str(unpacked), "SPENDGATE_ADMIN_TOKEN": "admin"}
    with (
        serve_in_thread(FakeAnthropic()) as upstream,
        replica(db_url, upstream, tmp_path, cwd=tmp_path, env=env) as (url, _),
    ):
        body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": []}
        response = httpx.post(f"{url}/v1/messages", json=body, headers={"x-api-key": key})
        pages = [httpx.get(f"{url}/dashboard/{path}").status_code for path in ("sign-in", "static/style.css")]
    assert response.status_code == 200, response.text
    assert pages == [200, 200]
    where = subprocess.run(
        [sys.executable, "-c", "import json, proxy.gateway.handler as m; print(json.dumps(m.__file__))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(unpacked)},
    )
    assert json.loads(where.stdout).startswith(str(unpacked))
