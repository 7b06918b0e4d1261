"""The ASGI app serving `/v1/*`: route, gate, relay, meter, and one record per call, in that order.

Every request that reaches it leaves exactly one usage record (refused, forwarded, failed or cut off), queued
in the one `finally` below; nothing reaches the upstream without a route, a key and the gate's checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.types import Receive, Scope, Send

from proxy.errors import LedgerUnavailable, ProxyError
from proxy.gateway.batches import Batches
from proxy.gateway.bodies import ClientGone
from proxy.gateway.call import Call, describe, label, make_record
from proxy.gateway.gate import Gate
from proxy.gateway.meters import respond_messages, respond_plain
from proxy.gateway.models import Models
from proxy.gateway.relay import OVERHEAD_HEADER, Relay
from proxy.gateway.routes import Route, allowed_methods, classify
from proxy.ledger.keys import KeyInfo
from proxy.ledger.writer import Writer
from proxy.pricing.table import PriceTable
from proxy.types import UsageRecord, usd

logger = logging.getLogger("spendgate")
# How long a browser may cache a preflight answer.
PREFLIGHT_MAX_AGE = b"86400"


class Gateway:
    """The request path for every `/v1/*` target."""

    def __init__(
        self, *, gate: Gate, relay: Relay, batches: Batches, models: Models, prices: PriceTable, ledger: Writer
    ) -> None:
        self._gate = gate
        self._relay = relay
        self._batches = batches
        self._models = models
        self._prices = prices
        self._ledger = ledger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        target: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        headers: dict[bytes, bytes] = dict(scope["headers"])
        call = Call(label(target.decode("latin-1"), 200))
        try:
            if method == "OPTIONS":
                await _preflight(allowed_methods(target, scope["query_string"]), headers, send, call)
                return
            route = classify(method, target, scope["query_string"])
            call.endpoint = route.endpoint
            if self._ledger.full:
                raise LedgerUnavailable(
                    f"spendgate cannot record calls right now ({self._ledger.pending} records wait for the ledger), "
                    "so it sends none."
                )
            describe(call, headers)
            key = await self._gate.authenticate(call, headers)
            if route.is_batch:
                await self._batches(call, route, key, scope, receive, send)
            else:
                await self._call(call, route, key, scope, receive, send)
        except ProxyError as error:
            call.refuse(error)
            await _send_error(send, error, call)
        except ClientGone:
            call.facts.disconnected = True
        except asyncio.CancelledError:
            # Only the server cancels a request task: its shutdown grace ran out with this call still going.
            call.facts.interrupted = True
            raise
        except Exception:
            # A bug of ours: still recorded, then left to the server (a 500, or a closed connection).
            call.facts.crashed = True
            call.status = call.status or 500
            raise
        finally:
            if method != "OPTIONS" or call.facts.refusal is not None:
                self._record(call, method)

    async def _call(self, call: Call, route: Route, key: KeyInfo, scope: Scope, receive: Receive, send: Send) -> None:
        """Messages, token counting, the model list, and every other route spendgate does not meter."""
        body = await self._gate.bodies.read(receive)
        if route.kind == "models_list":
            await self._models.list(call, route, key, scope, receive, send, body)
            return
        if route.kind == "model_retrieve":
            await self._models.retrieve(call, route, key, scope, receive, send, body)
            return
        if route.kind == "messages":
            call.metered = True
            body = await self._gate.admit_message(call, key, body, tokens=True)
            respond = respond_messages(call, self._prices, send)
        else:
            if route.kind == "count_tokens":
                body = await self._gate.admit_message(call, key, body, tokens=False)
            respond = respond_plain(call, send)
        await self._relay.exchange(call, route, scope, receive, body, respond)

    def _record(self, call: Call, method: str) -> None:
        try:
            record = make_record(call, self._prices)
        except Exception:
            logger.exception("could not build the usage record of %s; recording it without its usage", call.id)
            call.usage, call.priced = None, None
            record = make_record(call, self._prices)
        self._gate.finished(call, record)
        self._ledger.submit(record)
        _log(record, method)


def _log(record: UsageRecord, method: str) -> None:
    added_ms = round(record.latency_ms - (record.upstream_ms or 0.0), 3)
    fields = {
        "call_id": record.id,
        "method": method[:20],
        "endpoint": record.endpoint,
        "status": record.status,
        "outcome": record.outcome,
        "error_type": record.error_type,
        "team": record.team,
        "key_id": record.key_id,
        "model": record.response_model or record.model,
        "cost_usd": usd(record.cost_usd),
        "latency_ms": record.latency_ms,
        "added_ms": added_ms,
        "upstream_request_id": record.upstream_request_id,
    }
    logger.info(
        "%s %s %d %s team=%s key=%s model=%s cost=%s id=%s %.1fms (added %.2fms)",
        method[:20],
        record.endpoint,
        record.status,
        record.outcome,
        record.team,
        record.key_id,
        record.model,
        record.cost_usd,
        record.id,
        record.latency_ms,
        added_ms,
        extra={"call": fields},
    )


async def _preflight(methods: tuple[str, ...], headers: dict[bytes, bytes], send: Send, call: Call) -> None:
    """Answer a CORS preflight here, as Anthropic's API does for browsers (the TypeScript SDK's browser mode):
    any origin, the route's methods, the headers asked for. Nothing is forwarded: a preflight carries no key."""
    requested = headers.get(b"access-control-request-headers", b"")[:1024]
    answer = [
        (b"access-control-allow-origin", b"*"),
        (b"access-control-allow-methods", ", ".join(methods).encode()),
        (b"access-control-max-age", PREFLIGHT_MAX_AGE),
        (b"content-length", b"0"),
        (OVERHEAD_HEADER, call.overhead_ms().encode()),
    ]
    if requested:
        answer.append((b"access-control-allow-headers", requested))
    with contextlib.suppress(OSError):
        await send({"type": "http.response.start", "status": 204, "headers": answer})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_error(send: Send, error: ProxyError, call: Call) -> None:
    body = error.body()
    headers = [
        *error.headers(),
        (b"content-length", str(len(body)).encode()),
        (b"x-spendgate-request-id", call.id.encode()),
        (OVERHEAD_HEADER, call.overhead_ms().encode()),
    ]
    with contextlib.suppress(OSError):
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
