"""Message Batches through the proxy: owned by teams, held against budgets, metered from their results.

The API answers with an absolute `results_url` on api.anthropic.com and both SDKs fetch it as given, which
would bypass the proxy (anthropic-wire.md §5): every batch object we return points it at the proxy instead.
Results are metered as they stream through, one usage record per result, with ids derived from the batch and
`custom_id`, so reading results twice (or the reconciler reading them too) never counts anything twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import Receive, Scope, Send

from proxy.gateway.call import Call
from proxy.gateway.gate import Gate
from proxy.gateway.meters import ResultsMeter
from proxy.gateway.relay import Headers, Relay, read_whole, send_whole, stream_back
from proxy.gateway.routes import Route
from proxy.gateway.upstream import Upstream, UpstreamResponse
from proxy.ledger.batch_owners import BatchOwner, abandon, claim_unrecorded, owned_ids, release_lease, save_batch
from proxy.ledger.keys import KeyInfo, lookup_key_by_id
from proxy.pricing.table import PriceTable
from proxy.types import BATCHES, UsageRecord

logger = logging.getLogger("spendgate")
ANTHROPIC_VERSION = b"2023-06-01"


class Batches:
    """The Message Batches routes, on the same gate and relay as Messages."""

    def __init__(
        self,
        *,
        gate: Gate,
        relay: Relay,
        engine: Engine,
        prices: PriceTable,
        submit: Callable[[UsageRecord], None],
        results: ResultsFetcher,
        public_url: str | None,
    ) -> None:
        self._gate = gate
        self._relay = relay
        self._engine = engine
        self._prices = prices
        self._submit = submit
        self._results = results
        self._public_url = public_url

    async def __call__(
        self, call: Call, route: Route, key: KeyInfo, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Serve one batch call whose caller the gate has identified."""
        async with self._gate.bodies.batch(route, receive) as body:
            await self._serve(call, route, key, scope, receive, send, body)

    async def _serve(
        self, call: Call, route: Route, key: KeyInfo, scope: Scope, receive: Receive, send: Send, body: bytes
    ) -> None:
        owner = None
        if route.kind == "batch_create":
            call.metered = True
            body = await self._gate.admit_batch(call, key, body)
        elif route.batch_id is not None:
            owner = await self._gate.owner(key, route.batch_id)
            call.batch_id = owner.id
            if route.kind == "batch_delete" and not owner.results_recorded:
                # Deleting a batch deletes its results: meter them first, or its spend would never be seen.
                await self._results.record(owner, reader=key)
        if route.kind == "batch_results" and owner is not None:
            meter = ResultsMeter(owner, key=await self._creator(owner, key), prices=self._prices, submit=self._submit)
            await self._relay.exchange(call, route, scope, receive, body, self._metered(call, meter, send))
            return
        public_url = self._public_url or _public_url(scope)
        respond = partial(self._rewritten, call, route, key, public_url, send)
        await self._relay.exchange(call, route, scope, receive, body, respond)

    async def _creator(self, owner: BatchOwner, reader: KeyInfo) -> KeyInfo:
        """The key whose budget the results count against: the creator's, or the reader's if it is gone."""
        return await self._gate.ledger(partial(lookup_key_by_id, self._engine, owner.key_id)) or reader

    def _metered(self, call: Call, meter: ResultsMeter, send: Send) -> Callable[[UpstreamResponse, Headers], Any]:
        async def respond(response: UpstreamResponse, headers: Headers) -> None:
            if response.status != 200:
                await stream_back(call, response, send, headers, None)
                return
            complete = False
            try:
                await stream_back(call, response, send, headers, meter.feed)
                complete = call.facts.cut is None and not call.facts.disconnected
            finally:
                meter.finish(complete=complete)

        return respond

    async def _rewritten(
        self,
        call: Call,
        route: Route,
        key: KeyInfo,
        public_url: str,
        send: Send,
        response: UpstreamResponse,
        headers: Headers,
    ) -> None:
        """Relay a batch answer after recording a new batch's owner, filtering lists to the caller's team and
        pointing `results_url` at the proxy."""
        body = await read_whole(response, call)
        if response.status < 300:
            body = await self._gate.ledger(partial(self._rewrite, call, route, key, public_url, body))
        await send_whole(call, send, response.status, headers, body)

    def _rewrite(self, call: Call, route: Route, key: KeyInfo, public_url: str, body: bytes) -> bytes:
        """(blocking)"""
        if route.kind == "batch_delete":
            return body
        if route.kind == "batch_create" and call.hold is not None:
            created = _json_object(body)
            batch_id = created.get("id")
            if not isinstance(batch_id, str):
                logger.error("batch create answered %s without a batch id; its hold is released", call.id)
                return body
            call.batch_id = batch_id
            try:
                save_batch(
                    self._engine,
                    batch_id=batch_id,
                    key=key,
                    hold_call_id=call.id,
                    created_at=call.started_at,
                    feature=call.feature,
                    user=call.user,
                    session=call.session,
                    agent=call.agent,
                    parent_agent=call.parent_agent,
                )
            except SQLAlchemyError:
                # The batch exists upstream: hand it to the client all the same (a 5xx would make the SDK create
                # a second one), and say loudly that spendgate does not know it.
                logger.exception(
                    "batch %s was created but could not be recorded; its results are not metered", batch_id
                )
                return point_results_at(body, public_url)
            # The hold now covers the batch: it is released by the record of the batch's last result.
            call.hold = replace(call.hold, held=False)
        if route.kind == "batch_list":
            body = keep_owned(body, lambda ids: owned_ids(self._engine, key.team_id, ids))
        return point_results_at(body, public_url)


def _public_url(scope: Scope) -> str:
    """Where this client reached us: what batch objects' `results_url` must point at."""
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
    return f"{scope.get('scheme', 'http')}://{host}"


def point_results_at(body: bytes, public_url: str) -> bytes:
    """Rewrite `results_url` in a batch object, or in every batch of a list, to fetch through the proxy."""
    payload = _json_object(body)
    if not payload:
        return body
    batches = payload.get("data") if payload.get("type") != "message_batch" else [payload]
    for batch in batches if isinstance(batches, list) else ():
        if isinstance(batch, dict) and batch.get("results_url") and isinstance(batch.get("id"), str):
            batch["results_url"] = f"{public_url}{BATCHES}/{batch['id']}/results"
    return json.dumps(payload).encode()


def keep_owned(body: bytes, owned: Callable[[list[str]], set[str]]) -> bytes:
    """Drop from a batch list the batches the caller's team does not own; `owned` answers which ids it does."""
    payload = _json_object(body)
    data = payload.get("data")
    if not isinstance(data, list):
        # Never pass on a list we cannot filter: it may name other teams' batches.
        return json.dumps({"data": [], "has_more": False, "first_id": None, "last_id": None}).encode()
    mine = owned([batch["id"] for batch in data if isinstance(batch, dict) and isinstance(batch.get("id"), str)])
    # first_id / last_id stay the upstream's: they are the cursors for the next page, even when this page
    # held none of the team's batches.
    payload["data"] = [batch for batch in data if isinstance(batch, dict) and batch.get("id") in mine]
    return json.dumps(payload).encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultsFetcher:
    """Reads a batch's results from the upstream on spendgate's own key, and meters them."""

    engine: Engine
    upstream: Upstream
    upstream_url: str
    upstream_key: str | None
    prices: PriceTable
    submit: Callable[[UsageRecord], None]

    async def record(self, batch: BatchOwner, *, reader: KeyInfo | None = None) -> bool:
        """Meter the batch's results if it has ended; True when every result is recorded (or the batch is gone)."""
        status, body = await self._get(f"{BATCHES}/{batch.id}")
        if status == 404:
            # Deleted upstream before anyone read its results: nothing more can be metered; free its hold.
            await anyio.to_thread.run_sync(abandon, self.engine, batch)
            logger.warning("batch %s is gone upstream with its results unread; its hold is released", batch.id)
            return True
        if status != 200 or _json_object(body).get("processing_status") != "ended":
            return False
        key = await anyio.to_thread.run_sync(lookup_key_by_id, self.engine, batch.key_id) or reader
        if key is None:
            return False
        meter = ResultsMeter(batch, key=key, prices=self.prices, submit=self.submit)
        response = await self.upstream.send(
            "GET", f"{self.upstream_url}{BATCHES}/{batch.id}/results", self._headers(), b""
        )
        complete = False
        try:
            if response.status == 200:
                async for chunk in response.body:
                    meter.feed(chunk)
                complete = True
        finally:
            await response.close()
            meter.finish(complete=complete)
        if complete:
            logger.info("recorded %d results of batch %s", meter.results, batch.id)
        return complete

    async def reconcile(self, lease: timedelta) -> int:
        """Record ended batches nobody read through the proxy; each is leased to one replica at a time."""
        claimed = await anyio.to_thread.run_sync(
            partial(claim_unrecorded, self.engine, now=datetime.now(UTC), lease=lease)
        )
        recorded = 0
        for batch in claimed:
            done = False
            try:
                done = await self.record(batch)
            finally:
                if not done:
                    # Not ended yet (or the upstream failed): the next pass, here or on any replica, looks again
                    # rather than waiting out a lease that only guards reads in progress.
                    await anyio.to_thread.run_sync(release_lease, self.engine, batch.id)
            recorded += done
        return recorded

    async def _get(self, path: str) -> tuple[int, bytes]:
        response = await self.upstream.send("GET", f"{self.upstream_url}{path}", self._headers(), b"")
        try:
            return response.status, await read_whole(response)
        finally:
            await response.close()

    def _headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-api-key", (self.upstream_key or "").encode("latin-1")),
            (b"anthropic-version", ANTHROPIC_VERSION),
            (b"accept-encoding", b"identity"),
        ]


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return payload if isinstance(payload, dict) else {}
