"""Meters: what reads usage out of an answer as it passes, one per metered kind of answer.

- Messages, JSON or SSE (`respond_messages`): the usage, the serving model, whether a stream ended;
- token counting and every other route: relayed untouched, nothing to read (`respond_plain`);
- batch results (`ResultsMeter`): one usage record per result line, built by the same `make_record`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

from starlette.types import Send

from proxy.gateway.call import Call, label, make_record
from proxy.gateway.relay import Headers, Responder, read_whole, send_whole, stream_back
from proxy.gateway.upstream import UpstreamResponse
from proxy.gateway.usage import StreamUsage, parse_usage, summarize_json
from proxy.ledger.batch_owners import BatchOwner
from proxy.ledger.counters import counters_for
from proxy.ledger.keys import KeyInfo
from proxy.pricing.table import PriceTable
from proxy.types import BATCHES, Hold, UsageRecord

logger = logging.getLogger("spendgate")
ZERO = Decimal(0)


def respond_messages(call: Call, prices: PriceTable, send: Send) -> Responder:
    """Relay a Messages answer, reading its usage: streams through a tap, JSON whole with its cost header."""

    async def respond(response: UpstreamResponse, headers: Headers) -> None:
        if call.streamed:
            tap = StreamUsage()
            try:
                await stream_back(call, response, send, headers, tap.feed)
            finally:
                call.take(tap.summary(), stream=True)
            return
        body = await read_whole(response, call)
        call.take(summarize_json(body), stream=False)
        cost = call.cost(prices).cost_usd
        if cost is not None:
            headers.append((b"x-spendgate-cost-usd", format(cost, "f").encode()))
        await send_whole(call, send, response.status, headers, body)

    return respond


def respond_plain(call: Call, send: Send) -> Responder:
    """Relay an answer spendgate has nothing to read from, as it streams."""

    async def respond(response: UpstreamResponse, headers: Headers) -> None:
        await stream_back(call, response, send, headers, None)

    return respond


def result_record_id(batch_id: str, custom_id: str) -> str:
    """A result's usage-record id: the same every time the result is read."""
    return "sgb_" + hashlib.sha256(f"{batch_id}/{custom_id}".encode()).hexdigest()[:24]


class ResultsMeter:
    """Turns a batch's results JSONL, as it streams past, into one usage record per result.

    Spend counts against the key that created the batch. The batch's budget hold is released by the record of
    the last result (a batch has at least one), so spend and hold change together, and the ledger writer then
    marks the batch recorded. An interrupted read releases nothing; a later complete read (with the same
    record ids) finishes the job.
    """

    def __init__(
        self, batch: BatchOwner, *, key: KeyInfo, prices: PriceTable, submit: Callable[[UsageRecord], None]
    ) -> None:
        self._batch = batch
        self._key = key
        self._hold = Hold(
            call_id=batch.hold_call_id,
            counters=counters_for(key, batch.created_at, batch.user),
            amount=ZERO,
            held=False,
        )
        self._prices = prices
        self._submit = submit
        self._buffer = b""
        self._last: UsageRecord | None = None
        self.results = 0

    def feed(self, chunk: bytes) -> None:
        """Consume the next chunk of the JSONL body."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line)

    def finish(self, *, complete: bool) -> None:
        """The stream ended; `complete` when it ended normally (then the hold is released with the last record)."""
        if complete and self._buffer.strip():
            self._line(self._buffer)
        self._buffer = b""
        if self._last is not None:
            last = self._last
            if complete and last.hold is not None:
                last = replace(last, hold=replace(last.hold, held=True))
            self._submit(last)
            self._last = None

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):
            logger.warning("unreadable line in the results of batch %s", self._batch.id)
            return
        if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
            return
        record = self._record(item["custom_id"], item.get("result"))
        if self._last is not None:
            self._submit(self._last)
        self._last = record
        self.results += 1

    def _record(self, custom_id: str, result: Any) -> UsageRecord:
        result = result if isinstance(result, dict) else {}
        kind = result.get("type")
        message = result.get("message") if kind == "succeeded" else None
        message = message if isinstance(message, dict) else {}
        usage = message.get("usage")
        model = message.get("model")
        batch = self._batch
        call = Call(BATCHES, call_id=result_record_id(batch.id, custom_id), started_at=batch.created_at)
        call.key, call.batch_id, call.custom_id = self._key, batch.id, label(custom_id, 200)
        call.feature, call.user, call.session = batch.feature, batch.user, batch.session
        call.agent, call.parent_agent = batch.agent, batch.parent_agent
        call.metered = call.forwarded = True
        call.status = call.facts.status = 200
        if isinstance(model, str):
            call.model = call.response_model = label(model, 200)
        if isinstance(usage, dict):
            # Results are always billed at batch rates, whatever their usage says: the documented results
            # example carries no `service_tier`, and a standard price would be twice the bill.
            call.usage = replace(parse_usage(usage), service_tier="batch")
        if kind != "succeeded":
            call.facts.error_type = label(_error_type(result) or str(kind), 100)
        call.hold = self._hold
        return make_record(call, self._prices)


def _error_type(result: dict[str, Any]) -> str | None:
    # Errored results nest the standard error shape: {"type": "error", "error": {"type": ..., "message": ...}}.
    outer = result.get("error")
    inner = outer.get("error") if isinstance(outer, dict) else None
    kind = inner.get("type") if isinstance(inner, dict) else None
    return kind if isinstance(kind, str) else None
