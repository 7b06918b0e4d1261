from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, strategies as st

from proxy.pricing.table import PriceError, PriceTable
from proxy.types import IterationUsage, PriceSource, Usage

TABLE = PriceTable.load()

FEB = datetime(2026, 2, 15, tzinfo=UTC)  # Opus 4.6 still had its >200K tier
MAR = datetime(2026, 3, 1, tzinfo=UTC)  # Sonnet 4 / 4.5 still had theirs
OCT = datetime(2026, 10, 1, tzinfo=UTC)  # no tiers left but Haiku 5.5's prompt-length one

# Every expected figure below is worked out by hand from the published per-million-token cells.
CASES = [
    # 100,000 x $3 + 10,000 x $15 = $0.30 + $0.15
    pytest.param(
        "claude-sonnet-4-6", Usage(input_tokens=100_000, output_tokens=10_000), OCT, "0.45", id="worked-example"
    ),
    pytest.param("claude-sonnet-4-6", Usage(cache_creation_5m_input_tokens=100_000), OCT, "0.375", id="cache-5m"),
    pytest.param("claude-sonnet-4-6", Usage(cache_creation_1h_input_tokens=100_000), OCT, "0.6", id="cache-1h"),
    pytest.param("claude-sonnet-4-6", Usage(cache_read_input_tokens=100_000), OCT, "0.03", id="cache-read"),
    # 1,000 x 3 + 2,000 x 3.75 + 3,000 x 6 + 4,000 x 0.30 + 500 x 15 = 37,200 per million
    pytest.param(
        "claude-sonnet-4-6",
        Usage(
            input_tokens=1_000,
            cache_creation_5m_input_tokens=2_000,
            cache_creation_1h_input_tokens=3_000,
            cache_read_input_tokens=4_000,
            output_tokens=500,
        ),
        OCT,
        "0.0372",
        id="every-kind",
    ),
    # 1,000 x 1.50 + 500 x 7.50 + (7,500 + 18,000 + 1,200) / 2 = 18,600 per million
    pytest.param(
        "claude-sonnet-4-6",
        Usage(
            input_tokens=1_000,
            cache_creation_5m_input_tokens=2_000,
            cache_creation_1h_input_tokens=3_000,
            cache_read_input_tokens=4_000,
            output_tokens=500,
            service_tier="batch",
        ),
        OCT,
        "0.0186",
        id="batch-with-cache",
    ),
    # The final (message_delta) input of the docs' web-search stream: 10,682 x 3 + 500 x 15, plus 3 x $0.01
    pytest.param(
        "claude-sonnet-4-6",
        Usage(input_tokens=10_682, output_tokens=500, web_search_requests=3),
        OCT,
        "0.069546",
        id="web-search",
    ),
    # The search fee is not halved by batch: 10,000 x 1.50 per million + 2 x $0.01
    pytest.param(
        "claude-sonnet-4-6",
        Usage(input_tokens=10_000, web_search_requests=2, service_tier="batch"),
        OCT,
        "0.035",
        id="web-search-batch",
    ),
    pytest.param(
        "claude-sonnet-4-6", Usage(input_tokens=1_000, web_fetch_requests=5), OCT, "0.003", id="web-fetch-free"
    ),
    # (100,000 x 5 + 10,000 x 25) x 1.1
    pytest.param(
        "claude-opus-4-6",
        Usage(input_tokens=100_000, output_tokens=10_000, inference_geo="us"),
        OCT,
        "0.825",
        id="residency-opus-4-6",
    ),
    # (10,000 x 5 + 100,000 x 0.50 + 1,000 x 25) x 1.1
    pytest.param(
        "claude-opus-4-8",
        Usage(input_tokens=10_000, cache_read_input_tokens=100_000, output_tokens=1_000, inference_geo="us"),
        OCT,
        "0.1375",
        id="residency-opus-4-8-cache-read",
    ),
    pytest.param(
        "claude-sonnet-4-5",
        Usage(input_tokens=100_000, output_tokens=10_000, inference_geo="us"),
        OCT,
        "0.45",
        id="residency-sonnet-4-5-no-multiplier",
    ),
    pytest.param(
        "claude-opus-4-6",
        Usage(input_tokens=100_000, output_tokens=10_000, inference_geo="global"),
        OCT,
        "0.75",
        id="residency-global",
    ),
    # 10,000 x 10 + 2,000 x 50
    pytest.param(
        "claude-opus-4-8", Usage(input_tokens=10_000, output_tokens=2_000, speed="fast"), OCT, "0.2", id="fast-opus-4-8"
    ),
    # Fast cache cells keep their ratio: 1,000 x 10 + 1,000 x 12.50 + 1,000 x 20 + 10,000 x 1 + 1,000 x 50
    pytest.param(
        "claude-opus-5",
        Usage(
            input_tokens=1_000,
            cache_creation_5m_input_tokens=1_000,
            cache_creation_1h_input_tokens=1_000,
            cache_read_input_tokens=10_000,
            output_tokens=1_000,
            speed="fast",
        ),
        OCT,
        "0.1025",
        id="fast-opus-5-cache",
    ),
    # Opus 4.6 fast mode was $30/$150 in March: 10,000 x 30 + 1,000 x 150
    pytest.param(
        "claude-opus-4-6",
        Usage(input_tokens=10_000, output_tokens=1_000, speed="fast"),
        MAR,
        "0.45",
        id="fast-opus-4-6-march",
    ),
    # From 2026-09 Opus 4.6 bills fast requests at standard rates: 10,000 x 5 + 1,000 x 25
    pytest.param(
        "claude-opus-4-6",
        Usage(input_tokens=10_000, output_tokens=1_000, speed="fast"),
        OCT,
        "0.075",
        id="fast-opus-4-6-gone",
    ),
    pytest.param(
        "claude-sonnet-4-6",
        Usage(input_tokens=10_000, output_tokens=1_000, speed="fast"),
        OCT,
        "0.045",
        id="fast-unpublished",
    ),
    # (10,000 x 10 + 1,000 x 50) x 1.1
    pytest.param(
        "claude-opus-5",
        Usage(input_tokens=10_000, output_tokens=1_000, speed="fast", inference_geo="us"),
        OCT,
        "0.165",
        id="fast-with-residency",
    ),
    # Opus 5.5's fast cache read keeps its 0.05x: 1,000 x 8 + 10,000 x 0.40 + 1,000 x 40
    pytest.param(
        "claude-opus-5-5",
        Usage(input_tokens=1_000, cache_read_input_tokens=10_000, output_tokens=1_000, speed="fast"),
        OCT,
        "0.052",
        id="fast-opus-5-5-cache-read",
    ),
    # Exactly 200,000 is not over the threshold: 200,000 x 3 + 1,000 x 15
    pytest.param(
        "claude-sonnet-4-5", Usage(input_tokens=200_000, output_tokens=1_000), MAR, "0.615", id="long-context-at-200000"
    ),
    # 200,001 x 6 + 1,000 x 22.50
    pytest.param(
        "claude-sonnet-4-5",
        Usage(input_tokens=200_001, output_tokens=1_000),
        MAR,
        "1.222506",
        id="long-context-at-200001",
    ),
    # The tier was retired on 2026-04-30: 200,001 x 3 + 1,000 x 15
    pytest.param(
        "claude-sonnet-4-5",
        Usage(input_tokens=200_001, output_tokens=1_000),
        OCT,
        "0.615003",
        id="long-context-retired",
    ),
    # Cache tokens count toward the threshold: 1 x 6 + 100,000 x 7.50 + 100,000 x 0.60
    pytest.param(
        "claude-sonnet-4-20250514",
        Usage(input_tokens=1, cache_creation_5m_input_tokens=100_000, cache_read_input_tokens=100_000),
        MAR,
        "0.810006",
        id="long-context-counts-cache",
    ),
    # 250,000 x 3 + 1,000 x 11.25 (batch cells of the tier)
    pytest.param(
        "claude-sonnet-4-5",
        Usage(input_tokens=250_000, output_tokens=1_000, service_tier="batch"),
        MAR,
        "0.76125",
        id="long-context-batch",
    ),
    # Opus 4.6 at launch: 300,000 x 10 + 1,000 x 37.50
    pytest.param(
        "claude-opus-4-6",
        Usage(input_tokens=300_000, output_tokens=1_000),
        FEB,
        "3.0375",
        id="long-context-opus-4-6-feb",
    ),
    pytest.param(
        "claude-opus-4-6",
        Usage(input_tokens=300_000, output_tokens=1_000),
        MAR,
        "1.525",
        id="long-context-opus-4-6-march",
    ),
    # Haiku 5.5 by prompt length: 100,000 x 0.10 + 1,000 x 0.50, then 100,001 x 0.50 + 1,000 x 2.50
    pytest.param(
        "claude-haiku-5-5", Usage(input_tokens=100_000, output_tokens=1_000), OCT, "0.0105", id="haiku-5-5-short"
    ),
    pytest.param(
        "claude-haiku-5-5", Usage(input_tokens=100_001, output_tokens=1_000), OCT, "0.0525005", id="haiku-5-5-long"
    ),
    pytest.param("claude-sonnet-4-5", Usage(input_tokens=1_000, output_tokens=100), OCT, "0.0045", id="alias"),
    pytest.param(
        "claude-haiku-4-5-20251001", Usage(input_tokens=1_000, output_tokens=100), OCT, "0.0015", id="dated-id"
    ),
    pytest.param(
        "claude-opus-4-1-20250805", Usage(input_tokens=1_000, output_tokens=100), OCT, "0.0225", id="dated-opus-4-1"
    ),
    # 1,000 x 0.80 + 1,000 x 0.08 + 100 x 4
    pytest.param(
        "claude-3-5-haiku-20241022",
        Usage(input_tokens=1_000, cache_read_input_tokens=1_000, output_tokens=100),
        OCT,
        "0.00128",
        id="haiku-3-5",
    ),
    # Haiku 3's rounded cells: 1,000 x (0.25 + 0.30 + 0.50 + 0.03 + 1.25)
    pytest.param(
        "claude-3-haiku-20240307",
        Usage(
            input_tokens=1_000,
            cache_creation_5m_input_tokens=1_000,
            cache_creation_1h_input_tokens=1_000,
            cache_read_input_tokens=1_000,
            output_tokens=1_000,
        ),
        OCT,
        "0.00233",
        id="haiku-3-rounded-cells",
    ),
    # 1,000 x 0.125 + 1,000 x 0.625 + 1,000 x 0.30 / 2
    pytest.param(
        "claude-3-haiku-20240307",
        Usage(input_tokens=1_000, output_tokens=1_000, cache_creation_5m_input_tokens=1_000, service_tier="batch"),
        OCT,
        "0.0009",
        id="haiku-3-batch",
    ),
    pytest.param("claude-fable-5-1", Usage(cache_read_input_tokens=1_000_000), OCT, "0.25", id="fable-5-1-cache-read"),
    pytest.param("claude-fable-5", Usage(cache_read_input_tokens=1_000_000), OCT, "1", id="fable-5-cache-read"),
    pytest.param("claude-opus-5-5", Usage(cache_read_input_tokens=1_000_000), OCT, "0.2", id="opus-5-5-cache-read"),
    pytest.param(
        "claude-mythos-5-1",
        Usage(cache_read_input_tokens=1_000_000, inference_geo="us"),
        OCT,
        "0.275",
        id="mythos-5-1-residency",
    ),
    pytest.param(
        "claude-sonnet-5", Usage(input_tokens=1_000_000, output_tokens=1_000_000), OCT, "12", id="whole-dollars"
    ),
    pytest.param(
        "claude-sonnet-4-6",
        Usage(input_tokens=100_000, output_tokens=10_000, service_tier="priority"),
        OCT,
        "0.45",
        id="priority-at-standard",
    ),
    pytest.param("claude-sonnet-4-6", Usage(), OCT, "0", id="no-tokens"),
    # Compaction is only in the iterations: 180,000 x 3 + 3,500 x 15 + 23,000 x 3 + 1,000 x 15
    pytest.param(
        "claude-sonnet-4-6",
        Usage(
            input_tokens=23_000,
            output_tokens=1_000,
            iterations=(
                IterationUsage(type="compaction", input_tokens=180_000, output_tokens=3_500),
                IterationUsage(type="message", input_tokens=23_000, output_tokens=1_000),
            ),
        ),
        OCT,
        "0.6765",
        id="iterations-compaction",
    ),
    # Each iteration at its own model, the search fee once: (10,000 x 3 + 1,000 x 15) + (5,000 x 5 + 500 x 25) + $0.01
    pytest.param(
        "claude-sonnet-4-6",
        Usage(
            input_tokens=10_000,
            output_tokens=1_000,
            web_search_requests=1,
            iterations=(
                IterationUsage(type="message", input_tokens=10_000, output_tokens=1_000),
                IterationUsage(type="advisor_message", model="claude-opus-4-8", input_tokens=5_000, output_tokens=500),
            ),
        ),
        OCT,
        "0.0925",
        id="iterations-advisor",
    ),
]


@pytest.mark.parametrize(("model", "usage", "at", "expected"), CASES)
def test_price_matches_hand_computed(model: str, usage: Usage, at: datetime, expected: str) -> None:
    cost = TABLE.price(model=model, usage=usage, at=at)
    assert cost.cost_usd is not None
    assert format(cost.cost_usd, "f") == expected  # exact, and without trailing zeros
    assert cost.price_source == "table"
    assert cost.price_version == TABLE.version_at(at)


@pytest.mark.parametrize(
    ("model", "usage", "expected", "source"),
    [
        # Sonnet 5.5, the sonnet family's newest: 100,000 x 2 + 10,000 x 10
        pytest.param(
            "claude-sonnet-9-9", Usage(input_tokens=100_000, output_tokens=10_000), "0.3", "family", id="family"
        ),
        pytest.param("claude-mythos-preview", Usage(cache_read_input_tokens=1_000_000), "0.2", "family", id="mythos"),
        pytest.param("gpt-4o", Usage(input_tokens=100_000), None, "unpriced", id="unknown"),
        pytest.param(
            "claude-sonnet-4-6",
            Usage(iterations=(IterationUsage(type="fallback_message", model="claude-opus-9", input_tokens=1_000_000),)),
            "4",
            "family",
            id="iteration-family",
        ),
        pytest.param(
            "claude-sonnet-4-6",
            Usage(
                iterations=(IterationUsage(type="message", input_tokens=1), IterationUsage(type="x", model="gpt-4o"))
            ),
            None,
            "unpriced",
            id="iteration-unknown",
        ),
    ],
)
def test_price_unlisted_models(model: str, usage: Usage, expected: str | None, source: PriceSource) -> None:
    cost = TABLE.price(model=model, usage=usage, at=OCT)
    assert cost.cost_usd == (None if expected is None else Decimal(expected))
    assert (cost.price_source, cost.price_version) == (source, "2026-09-01")


@pytest.mark.parametrize("model", ["claude-opus-4-6", "claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"])
def test_a_dated_snapshot_of_a_listed_model_is_that_model(model: str) -> None:
    """Not its family's newest: `claude-opus-4-6-20260205` was priced as Opus 5.5 (20% under the bill)."""
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000, cache_read_input_tokens=10_000)
    listed = TABLE.price(model=model, usage=usage, at=OCT)
    dated = TABLE.price(model=f"{model}-20260205", usage=usage, at=OCT)
    assert (dated.cost_usd, dated.price_source) == (listed.cost_usd, "table")
    # Not "listed" as a metric label, though: a client can invent any number of dates.
    assert not TABLE.lists(f"{model}-20260205")


def test_fallbacks_are_logged_once_per_model(caplog: pytest.LogCaptureFixture) -> None:
    table = PriceTable.load()
    for _ in range(3):
        table.price(model="claude-sonnet-9-9", usage=Usage(input_tokens=1), at=OCT)
        table.price(model="gpt-4o", usage=Usage(input_tokens=1), at=OCT)
    said = [record.getMessage() for record in caplog.records if record.name == "spendgate"]
    assert len(said) == 2
    assert "claude-sonnet-9-9" in said[0] and "price_source family" in said[0]
    assert "gpt-4o" in said[1] and "unpriced" in said[1]


@pytest.mark.parametrize(
    "model",
    [
        "claude-fable-5-1",
        "claude-mythos-5-1",
        "claude-fable-5",
        "claude-mythos-5",
        "claude-opus-5-5",
        "claude-opus-5",
        "claude-opus-4-8",
        "claude-opus-4-7",
        "claude-opus-4-6",
        "claude-opus-4-5",
        "claude-opus-4-5-20251101",
        "claude-opus-4-1",
        "claude-opus-4-1-20250805",
        "claude-opus-4-0",
        "claude-opus-4-20250514",
        "claude-4-opus-20250514",
        "claude-3-opus-20240229",
        "claude-sonnet-5-5",
        "claude-sonnet-5",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5",
        "claude-sonnet-4-5-20250929",
        "claude-sonnet-4-0",
        "claude-sonnet-4-20250514",
        "claude-4-sonnet-20250514",
        "claude-3-7-sonnet-20250219",
        "claude-3-7-sonnet-latest",
        "claude-3-5-sonnet-20241022",
        "claude-haiku-5-5",
        "claude-haiku-4-5",
        "claude-haiku-4-5-20251001",
        "claude-3-5-haiku-20241022",
        "claude-3-5-haiku-latest",
        "claude-3-haiku-20240307",
    ],
)
def test_shipped_table_lists_model(model: str) -> None:
    for at in (FEB, MAR, OCT):
        found = TABLE.lookup(model, at)
        assert found is not None and found[1] == "table"


def test_lookup_resolves_alias_to_snapshot() -> None:
    found = TABLE.lookup("claude-sonnet-4-5", OCT)
    assert found is not None
    price, source = found
    assert (price.model, source) == ("claude-sonnet-4-5-20250929", "table")
    assert price.standard.input == Decimal("3")
    assert TABLE.lookup("llama-3", OCT) is None


@pytest.mark.parametrize(
    ("at", "version"),
    [
        pytest.param(datetime(2024, 1, 1, tzinfo=UTC), "2025-08-01", id="before-first"),
        pytest.param(datetime(2026, 4, 30, tzinfo=UTC) - timedelta(microseconds=1), "2026-03-01", id="just-before"),
        pytest.param(datetime(2026, 4, 30, tzinfo=UTC), "2026-04-30", id="at-start"),
        pytest.param(datetime(2026, 4, 30, 1, 0), "2026-04-30", id="naive-is-utc"),
        pytest.param(OCT, "2026-09-01", id="latest"),
    ],
)
def test_version_at(at: datetime, version: str) -> None:
    assert TABLE.version_at(at) == version


def test_describe_whole_table() -> None:
    text = TABLE.describe(model=None, at=OCT)
    assert text.startswith("price version 2026-09-01")
    assert "claude-fable-5-1" in text and "cache read 0.25" in text
    assert "over 100000" in text  # Haiku 5.5's prompt-length tier


def test_describe_one_model() -> None:
    text = TABLE.describe(model="claude-sonnet-4-5", at=MAR)
    assert text.splitlines() == [
        "price version 2026-03-01 (from 2026-03-01T00:00:00+00:00), USD per million tokens",
        "claude-sonnet-4-5-20250929 (aliases: claude-sonnet-4-5)",
        "  standard        input 3  output 15  5m write 3.75  1h write 6  cache read 0.30  batch 1.50 / 7.50",
        "  over 200000     input 6  output 22.50  5m write 7.50  1h write 12  cache read 0.60  batch 3 / 11.25",
    ]
    assert "fast            input 10  output 50  5m write 12.5" in TABLE.describe(model="claude-opus-5", at=OCT)
    assert "priced as its family's claude-opus-5-5" in TABLE.describe(model="claude-opus-9", at=OCT)
    assert "gpt-4o: no price" in TABLE.describe(model="gpt-4o", at=OCT)


SONNET_CELLS = """
input = 2.5
output = 12.5
cache_write_5m = 3.125
cache_write_1h = 5
cache_read = 0.25
batch_input = 1.25
batch_output = 6.25
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_override_adds_model(tmp_path: Path) -> None:
    path = write(tmp_path, '[[version]]\nid = "2025-08-01"\n[version.models.claude-sonnet-4-7]\n' + SONNET_CELLS)
    table = PriceTable.load(path)
    for at in (FEB, OCT):
        cost = table.price(model="claude-sonnet-4-7", usage=Usage(input_tokens=1_000_000), at=at)
        assert (cost.cost_usd, cost.price_source) == (Decimal("2.5"), "table")
    assert table.price(model="claude-sonnet-4-6", usage=Usage(input_tokens=1_000_000), at=OCT).cost_usd == Decimal(3)


def test_override_changes_price(tmp_path: Path) -> None:
    path = write(tmp_path, '[[version]]\nid = "2026-09-01"\n[version.models.claude-sonnet-4-6]\n' + SONNET_CELLS)
    table = PriceTable.load(path)
    usage = Usage(input_tokens=100_000, output_tokens=10_000)
    # 100,000 x 2.50 + 10,000 x 12.50 from 2026-09-01; the March version keeps $0.45
    assert table.price(model="claude-sonnet-4-6", usage=usage, at=OCT).cost_usd == Decimal("0.375")
    assert table.price(model="claude-sonnet-4-6", usage=usage, at=MAR).cost_usd == Decimal("0.45")


def test_override_adds_dated_version(tmp_path: Path) -> None:
    text = '[[version]]\nid = "2027-01-01"\neffective_from = 2027-01-01T00:00:00Z\n[version.models.claude-sonnet-4-6]\n'
    table = PriceTable.load(write(tmp_path, text + SONNET_CELLS))
    usage = Usage(input_tokens=100_000, output_tokens=10_000)
    later = datetime(2027, 2, 1, tzinfo=UTC)
    assert table.price(model="claude-sonnet-4-6", usage=usage, at=later) == replace(
        TABLE.price(model="claude-sonnet-4-6", usage=usage, at=OCT),
        cost_usd=Decimal("0.375"),
        price_version="2027-01-01",
    )
    assert table.price(model="claude-sonnet-4-6", usage=usage, at=OCT).cost_usd == Decimal("0.45")
    # Models the new version does not mention carry over: 100,000 x 5 + 10,000 x 25
    assert table.price(model="claude-opus-4-8", usage=usage, at=later).cost_usd == Decimal("0.75")


MODEL_HEAD = '[[version]]\nid = "2026-09-01"\n[version.models.claude-x]\n'
GOOD_CELLS = (
    "input = 3\noutput = 15\ncache_write_5m = 3.75\ncache_write_1h = 6\ncache_read = 0.30\nbatch_input = 1.50\n"
)


@pytest.mark.parametrize(
    ("text", "key", "shown"),
    [
        pytest.param(MODEL_HEAD + GOOD_CELLS + "batch_output = -1\n", "claude-x.batch_output", "= -1", id="negative"),
        pytest.param(
            MODEL_HEAD + GOOD_CELLS + 'batch_output = "7.50"\n', "claude-x.batch_output", "= '7.50'", id="string"
        ),
        pytest.param(MODEL_HEAD + GOOD_CELLS + "batch_output = nan\n", "claude-x.batch_output", "= NaN", id="nan"),
        pytest.param(MODEL_HEAD + GOOD_CELLS, "claude-x.batch_output", "is required", id="missing"),
        pytest.param(
            MODEL_HEAD + GOOD_CELLS + "batch_output = 7.5\ninptu = 3\n", "claude-x.inptu", "unknown key", id="typo"
        ),
        pytest.param(
            MODEL_HEAD + GOOD_CELLS + 'batch_output = 7.5\naliases = ["claude-sonnet-4-5"]\n',
            "version[2026-09-01].models.claude-x",
            "= 'claude-sonnet-4-5': already names claude-sonnet-4-5-20250929",
            id="alias-taken",
        ),
        pytest.param(
            # A cache read of 0.10 on a $3 input scales to 0.333... at a $10 fast input.
            MODEL_HEAD
            + GOOD_CELLS.replace("0.30", "0.10")
            + "batch_output = 7.5\nfast = { input = 10, output = 50 }\n",
            "claude-x.fast",
            "cannot scale",
            id="fast-inexact",
        ),
        pytest.param(
            MODEL_HEAD + GOOD_CELLS + "batch_output = 7.5\nlong_context = { threshold = 2.5e5 }\n",
            "claude-x.long_context.threshold",
            "= 2.5E+5",
            id="threshold-not-int",
        ),
        pytest.param(
            '[[version]]\nid = "2027-01-01"\neffective_from = 2027-01-01T00:00:00\n',
            "version[2027-01-01].effective_from",
            "must be a date-time with an offset",
            id="naive-date",
        ),
        pytest.param(
            '[[version]]\nid = "2027-01-01"\n', "version[2027-01-01].effective_from", "required", id="new-no-date"
        ),
        pytest.param(
            '[[version]]\nid = "2026-09-01"\n[version.families]\nsonnet = "claude-nope"\n',
            "version[2026-09-01].families.sonnet",
            "= 'claude-nope': is not a model",
            id="family-target",
        ),
        pytest.param(
            '[[version]]\nid = "2027-01-01"\neffective_from = 2026-09-01T00:00:00Z\n',
            "version[2027-01-01].effective_from",
            "is also when version 2026-09-01 starts",
            id="same-start",
        ),
        pytest.param(MODEL_HEAD + 'aliases = "claude-y"\n', "claude-x.aliases", "= 'claude-y'", id="aliases-not-list"),
        pytest.param(
            '[[version]]\nid = "2026-09-01"\nmodels = 1\n', "version[2026-09-01].models", "must be a table", id="models"
        ),
        pytest.param(
            '[[version]]\nid = "2026-09-01"\n[version.families]\nsonnet = 1\n',
            "version[2026-09-01].families.sonnet",
            "= 1: must be a model id",
            id="family-not-string",
        ),
        pytest.param("[[version]]\nid = 5\n", "version[0].id", "= 5", id="id-not-string"),
        pytest.param("version = 1\n", "version = 1", "[[version]]", id="version-not-array"),
        pytest.param("[[version]\n", "not valid TOML", "", id="syntax"),
        pytest.param("prices = 1\n", "prices", "unknown key", id="top-level"),
    ],
)
def test_override_errors_name_file_key_value(tmp_path: Path, text: str, key: str, shown: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PriceError) as caught:
        PriceTable.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert key in message and shown in message
    assert "\n" not in message


def test_override_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PriceError, match="cannot read"):
        PriceTable.load(tmp_path / "absent.toml")


# Properties. Models without a context tier at OCT, so that cost is linear in every count.
LINEAR_MODELS = [
    "claude-fable-5-1",
    "claude-opus-5-5",
    "claude-opus-5",
    "claude-opus-4-8",
    "claude-opus-4-6",
    "claude-sonnet-4-6",
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
    "claude-3-haiku-20240307",
    "claude-sonnet-9",
]
MODELS = [*LINEAR_MODELS, "claude-haiku-5-5", "claude-sonnet-4-20250514", "gpt-4o"]
KINDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_5m_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_read_input_tokens",
    "web_search_requests",
)
COUNT = st.integers(min_value=0, max_value=2_000_000)
USAGES = st.builds(
    Usage,
    **dict.fromkeys(KINDS, COUNT),
    service_tier=st.sampled_from([None, "standard", "batch", "priority"]),
    speed=st.sampled_from([None, "standard", "fast"]),
    inference_geo=st.sampled_from([None, "global", "us", "not_available"]),
)
DATES = st.sampled_from([FEB, MAR, OCT])


@given(model=st.sampled_from(LINEAR_MODELS), usage=USAGES)
def test_cost_is_additive_over_kinds(model: str, usage: Usage) -> None:
    def cost(u: Usage) -> Decimal:
        amount = TABLE.price(model=model, usage=u, at=OCT).cost_usd
        assert amount is not None
        return amount

    others: list[dict[str, Any]] = [{other: 0 for other in KINDS if other != kind} for kind in KINDS]
    alone = [replace(usage, **zeros) for zeros in others]
    assert cost(usage) == sum((cost(u) for u in alone), Decimal(0))


@given(model=st.sampled_from(MODELS), usage=USAGES, at=DATES)
def test_batch_is_half_of_standard(model: str, usage: Usage, at: datetime) -> None:
    usage = replace(usage, web_search_requests=0)
    batch = TABLE.price(model=model, usage=replace(usage, service_tier="batch"), at=at).cost_usd
    standard = TABLE.price(model=model, usage=replace(usage, service_tier="standard"), at=at).cost_usd
    assert batch == (None if standard is None else standard / 2)


@given(model=st.sampled_from(MODELS), usage=USAGES, at=DATES)
def test_cost_is_never_negative(model: str, usage: Usage, at: datetime) -> None:
    cost = TABLE.price(model=model, usage=usage, at=at).cost_usd
    assert cost is None or cost >= 0


@given(model=st.sampled_from(MODELS), usage=USAGES, at=DATES, kind=st.sampled_from(KINDS), more=COUNT)
def test_cost_is_monotone_in_every_count(model: str, usage: Usage, at: datetime, kind: str, more: int) -> None:
    before = TABLE.price(model=model, usage=usage, at=at).cost_usd
    after = TABLE.price(model=model, usage=replace(usage, **{kind: getattr(usage, kind) + more}), at=at).cost_usd
    if before is None:
        assert after is None
    else:
        assert after is not None and after >= before
