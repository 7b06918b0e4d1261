"""Alerts (soft limits crossed, drift from Anthropic's figures): a log line, and a JSON POST to
`SPENDGATE_ALERT_WEBHOOK`, retried in the background.

Delivery never delays a call: alerts are queued by the ledger writer and sent by their own task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from proxy.ledger.budgets import SoftLimitCrossed

logger = logging.getLogger("spendgate")

MAX_ATTEMPTS = 8
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 60.0


def alert_payload(alert: SoftLimitCrossed) -> dict[str, Any]:
    """The webhook's JSON body; money as exact decimal strings."""
    kind, _, name = alert.label.partition(" ")
    return {
        "event": "soft_limit_crossed",
        kind: name,
        "period": alert.period,
        "period_start": alert.period_start.isoformat(),
        "spent_usd": format(alert.spent_usd, "f"),
        "budget_usd": format(alert.budget_usd, "f"),
        "fraction": format(alert.fraction, "f"),
    }


class AlertSender:
    """Logs each crossing at once and delivers it to the webhook, if any, from a background task."""

    def __init__(self, webhook: str | None, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._webhook = webhook
        self._transport = transport
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def notify(self, alerts: list[SoftLimitCrossed]) -> None:
        """Log and queue alerts; never blocks."""
        for alert in alerts:
            logger.warning(
                "%s crossed %s%% of its %s budget: spent $%s of $%s",
                alert.label,
                format(alert.fraction * 100, "f"),
                alert.period,
                format(alert.spent_usd, "f"),
                format(alert.budget_usd, "f"),
            )
            if self._webhook is not None:
                self._queue.put_nowait(alert_payload(alert))

    def send(self, payload: dict[str, Any]) -> None:
        """Log and queue any other alert (its JSON body); never blocks."""
        logger.warning("alert: %s", payload)
        if self._webhook is not None:
            self._queue.put_nowait(payload)

    def start(self) -> None:
        """Start delivering (from the lifespan, inside the running loop)."""
        if self._webhook is not None:
            self._task = asyncio.create_task(self._deliver_forever(self._webhook))

    async def delivered(self) -> None:
        """Wait until every alert queued so far has been delivered (or given up on)."""
        if self._task is not None:
            await self._queue.join()

    async def close(self) -> None:
        """Stop delivering; alerts still queued are logged as undelivered."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            logger.error("alert not delivered before shutdown: %s", self._queue.get_nowait())

    async def _deliver_forever(self, url: str) -> None:
        async with httpx.AsyncClient(transport=self._transport, timeout=10.0) as client:
            while True:
                payload = await self._queue.get()
                try:
                    await self._deliver(client, url, payload)
                finally:
                    self._queue.task_done()

    async def _deliver(self, client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                response = await client.post(url, json=payload)
                if response.status_code < 300:
                    return
                problem = f"status {response.status_code}"
            except httpx.HTTPError as exc:
                problem = exc.__class__.__name__
            logger.warning("alert webhook attempt %d/%d failed (%s)", attempt, MAX_ATTEMPTS, problem)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        logger.error("alert webhook gave up after %d attempts: %s", MAX_ATTEMPTS, payload)


def notify_now(webhook: str | None, alerts: list[SoftLimitCrossed]) -> None:
    """Log and deliver alerts from outside a serving process (records replayed by the command line), waiting
    until each is delivered or given up on (blocking)."""
    if not alerts:
        return

    async def deliver() -> None:
        sender = AlertSender(webhook)
        sender.notify(alerts)
        sender.start()
        await sender.delivered()
        await sender.close()

    asyncio.run(deliver())
