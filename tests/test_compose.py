"""docker-compose.yml keeps what a deployment needs: no lost records on stop, state on volumes, loopback only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def service() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    spendgate: dict[str, Any] = compose["services"]["spendgate"]
    return spendgate


def test_stopping_waits_for_the_grace_and_the_drain() -> None:
    spendgate = service()
    grace = float(spendgate["environment"]["SPENDGATE_SHUTDOWN_GRACE_SECONDS"])
    stop = re.fullmatch(r"(\d+)s", spendgate["stop_grace_period"])
    assert stop and int(stop.group(1)) > grace + Settings().record_drain_seconds


def test_journals_and_spills_live_on_a_volume() -> None:
    spendgate = service()
    spill = spendgate["environment"]["SPENDGATE_SPILL_DIR"]
    assert any(volume.split(":")[1] == spill for volume in spendgate["volumes"])


def test_published_on_loopback_with_a_readiness_check() -> None:
    spendgate = service()
    assert all(port.startswith("127.0.0.1:") for port in spendgate["ports"])
    assert "/healthz" in " ".join(spendgate["healthcheck"]["test"])
    assert ":?" in spendgate["environment"]["ANTHROPIC_API_KEY"]


def test_compose_itself_accepts_the_file() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (the checks above still hold)")
    checked = subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test"},
    )
    assert checked.returncode == 0, checked.stderr
