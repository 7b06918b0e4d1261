"""Settings: every knob is an environment variable, read once into a frozen `Settings`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
LogFormat = Literal["text", "json"]
WriterMode = Literal["auto", "process", "thread"]

DEFAULT_DB_URL = "sqlite:///./spendgate.db"
DEFAULT_UPSTREAM_URL = "https://api.anthropic.com"
# The API's own limit for Messages requests; larger bodies would be refused upstream anyway.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the variable and the value."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the proxy needs to run. Build it with `Settings.from_environ(os.environ)`."""

    db_url: str = DEFAULT_DB_URL
    upstream_url: str = DEFAULT_UPSTREAM_URL
    anthropic_api_key: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    prices_path: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # A request body still arriving after this long is refused (408): a client trickling bytes holds a slot.
    body_timeout_seconds: float = 60.0
    # A request head (request line and headers) not complete this long after the connection opened, or after the
    # previous response on it, is closed (408 if part of it came): each connection holds a file descriptor.
    head_timeout_seconds: float = 10.0
    # Connections from one client address whose head is still arriving after a second (or half the head timeout),
    # at most; past it the oldest is closed.
    # 0: no bound per address (the bound on all of them, from the file-descriptor limit, still holds).
    max_pending_heads_per_client: int = 32
    # How long a key lookup is trusted before the ledger is asked again: the delay before a
    # revocation made on another replica takes effect here.
    key_cache_seconds: float = 5.0
    upstream_connect_timeout: float = 10.0
    # Anthropic may pause a stream for a long time (extended thinking); 10 minutes matches the SDKs' own timeout.
    upstream_read_timeout: float = 600.0
    upstream_max_connections: int = 512
    # How long `GET /v1/models` waits for the upstream before spendgate lists the models itself: Claude Code gives
    # the list 3 s in all.
    models_wait_seconds: float = 2.0
    record_flush_seconds: float = 0.05
    record_batch_size: int = 500
    # Where the ledger writer's transactions run: a child process per serving process, a thread of it, or (auto)
    # a child when the serving processes leave a core for it.
    ledger_writer: WriterMode = "auto"
    # On shutdown, how long we keep retrying a failing ledger before spilling records to a file, and how long we wait
    # for the ledger work of calls that stopped waiting for it (a hold or lease grant still landing).
    record_drain_seconds: float = 30.0
    # Records waiting for the ledger, at most; past it new calls are refused (503) rather than sent unrecorded.
    max_pending_records: int = 100_000
    # How long records may wait for the ledger before /healthz answers 503.
    ledger_stall_seconds: float = 30.0
    # The longest a call waits for an answer the ledger owes it (a budget hold, a lease or rate-limit exchange)
    # before it is refused 503: a locked or unreachable ledger must not hang calls.
    ledger_wait_seconds: float = 5.0
    # Each process beats this often; one silent for `heartbeat_limit_seconds` is dead and its holds recorded.
    heartbeat_seconds: float = 5.0
    heartbeat_limit_seconds: float = 30.0
    spill_dir: Path = Path("./spendgate-spill")
    graceful_shutdown_seconds: float = 60.0
    # Serving processes on this machine, each a replica of its own (instance, journal, writer, leases).
    workers: int = 1
    # Applies to teams without a cap of their own; None: no cap.
    default_max_output_tokens: int | None = None
    # A hold whose call never settles (its process died) is released after this long.
    reservation_ttl_seconds: float = 3600.0
    reservation_sweep_seconds: float = 30.0
    # When the ledger cannot be reached, budgeted calls are refused (503) unless this is set.
    budget_fail_open: bool = False
    soft_limit_fraction: Decimal = Decimal("0.8")
    alert_webhook: str | None = None
    # The proxy's address as clients know it (behind a load balancer); default: the Host each client used.
    public_url: str | None = None
    # How often ended batches whose results nobody read are fetched and recorded; 0: never.
    batch_reconcile_seconds: float = 300.0
    # Where Prometheus scrapes without a token (host, port); None: only `/metrics` on the proxy's port, which
    # wants `metrics_token` or the admin token.
    metrics_addr: tuple[str, int] | None = None
    metrics_token: str | None = field(default=None, repr=False)
    # Feature and end-user values that may become metric labels; every other value is counted as `other`.
    metrics_features: frozenset[str] = frozenset()
    metrics_users: frozenset[str] = frozenset()
    log_format: LogFormat = "text"
    # `spendgate reconcile`: an Anthropic Admin API key (sk-ant-admin…), where the Admin API is, the upstream key's
    # `apikey_…` id (so other keys' traffic is left out), and the cost difference in USD that is not drift.
    anthropic_admin_key: str | None = field(default=None, repr=False)
    # None: the upstream's own host (api.anthropic.com serves the Admin API beside the Messages API).
    anthropic_admin_url: str | None = None
    anthropic_api_key_id: str | None = None
    reconcile_tolerance: Decimal = Decimal("0.01")
    # How often the server reconciles closed days in the background (one replica at a time); 0: never.
    reconcile_every_seconds: float = 0.0
    # Sign-in with an OpenID Connect provider (None: the admin token is the only way in).
    oidc: OidcSettings | None = None
    # How long `spendgate login` waits between polls of a device grant (RFC 8628's interval), in whole seconds.
    device_poll_seconds: int = 5
    # `spendgate prune` without --before: keep this many whole UTC days of raw records; None: --before is needed.
    retention_days: int | None = None

    @property
    def admin_api_url(self) -> str:
        """Where `spendgate reconcile` reads Anthropic's reports: SPENDGATE_ANTHROPIC_ADMIN_URL, else the upstream."""
        return self.anthropic_admin_url or self.upstream_url

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Read `SPENDGATE_*` variables; keyword overrides (from CLI flags) win when not None."""
        base = cls(
            db_url=environ.get("SPENDGATE_DB_URL", DEFAULT_DB_URL),
            upstream_url=environ.get("SPENDGATE_UPSTREAM_URL", DEFAULT_UPSTREAM_URL).rstrip("/"),
            anthropic_api_key=environ.get("ANTHROPIC_API_KEY") or None,
            admin_token=environ.get("SPENDGATE_ADMIN_TOKEN") or None,
            host=environ.get("SPENDGATE_HOST", "127.0.0.1"),
            port=_read(environ, "SPENDGATE_PORT", int, 8080),
            prices_path=_read(environ, "SPENDGATE_PRICES", Path, None),
            max_body_bytes=_read(environ, "SPENDGATE_MAX_BODY_BYTES", int, DEFAULT_MAX_BODY_BYTES),
            body_timeout_seconds=_read(environ, "SPENDGATE_BODY_TIMEOUT_SECONDS", float, 60.0),
            head_timeout_seconds=_read(environ, "SPENDGATE_HEAD_TIMEOUT_SECONDS", float, 10.0),
            max_pending_heads_per_client=_read(environ, "SPENDGATE_MAX_PENDING_HEADS_PER_CLIENT", int, 32),
            key_cache_seconds=_read(environ, "SPENDGATE_KEY_CACHE_SECONDS", float, 5.0),
            upstream_connect_timeout=_read(environ, "SPENDGATE_UPSTREAM_CONNECT_TIMEOUT", float, 10.0),
            upstream_read_timeout=_read(environ, "SPENDGATE_UPSTREAM_READ_TIMEOUT", float, 600.0),
            spill_dir=_read(environ, "SPENDGATE_SPILL_DIR", Path, Path("./spendgate-spill")),
            ledger_writer=_read(environ, "SPENDGATE_LEDGER_WRITER", _writer_mode, "auto"),
            max_pending_records=_read(environ, "SPENDGATE_MAX_PENDING_RECORDS", int, 100_000),
            ledger_stall_seconds=_read(environ, "SPENDGATE_LEDGER_STALL_SECONDS", float, 30.0),
            ledger_wait_seconds=_read(environ, "SPENDGATE_LEDGER_WAIT_SECONDS", float, 5.0),
            heartbeat_seconds=_read(environ, "SPENDGATE_HEARTBEAT_SECONDS", float, 5.0),
            heartbeat_limit_seconds=_read(environ, "SPENDGATE_HEARTBEAT_LIMIT_SECONDS", float, 30.0),
            graceful_shutdown_seconds=_read(environ, "SPENDGATE_SHUTDOWN_GRACE_SECONDS", float, 60.0),
            workers=_read(environ, "SPENDGATE_WORKERS", int, 1),
            default_max_output_tokens=_read(environ, "SPENDGATE_DEFAULT_MAX_OUTPUT_TOKENS", int, None),
            reservation_ttl_seconds=_read(environ, "SPENDGATE_RESERVATION_TTL_SECONDS", float, 3600.0),
            reservation_sweep_seconds=_read(environ, "SPENDGATE_RESERVATION_SWEEP_SECONDS", float, 30.0),
            budget_fail_open=_read(environ, "SPENDGATE_BUDGET_FAIL_OPEN", _boolean, False),
            soft_limit_fraction=_read(environ, "SPENDGATE_SOFT_LIMIT_FRACTION", _fraction, Decimal("0.8")),
            alert_webhook=environ.get("SPENDGATE_ALERT_WEBHOOK") or None,
            public_url=(environ.get("SPENDGATE_PUBLIC_URL") or "").rstrip("/") or None,
            batch_reconcile_seconds=_read(environ, "SPENDGATE_BATCH_RECONCILE_SECONDS", float, 300.0),
            metrics_addr=_read(environ, "SPENDGATE_METRICS_ADDR", _address, None),
            metrics_token=environ.get("SPENDGATE_METRICS_TOKEN") or None,
            metrics_features=_read(environ, "SPENDGATE_METRICS_FEATURES", _names, frozenset()),
            metrics_users=_read(environ, "SPENDGATE_METRICS_USERS", _names, frozenset()),
            log_format=_read(environ, "SPENDGATE_LOG_FORMAT", _log_format, "text"),
            anthropic_admin_key=environ.get("SPENDGATE_ANTHROPIC_ADMIN_KEY") or None,
            anthropic_admin_url=(environ.get("SPENDGATE_ANTHROPIC_ADMIN_URL") or "").rstrip("/") or None,
            anthropic_api_key_id=environ.get("SPENDGATE_ANTHROPIC_API_KEY_ID") or None,
            reconcile_tolerance=_read(environ, "SPENDGATE_RECONCILE_TOLERANCE", Decimal, Decimal("0.01")),
            reconcile_every_seconds=_read(environ, "SPENDGATE_RECONCILE_EVERY_SECONDS", float, 0.0),
            oidc=OidcSettings.from_environ(environ),
            device_poll_seconds=_read(environ, "SPENDGATE_DEVICE_POLL_SECONDS", int, 5),
            retention_days=_read(environ, "SPENDGATE_RETENTION_DAYS", int, None),
        )
        given = {name: value for name, value in overrides.items() if value is not None}
        if "upstream_url" in given:
            given["upstream_url"] = given["upstream_url"].rstrip("/")
        settings = replace(base, **given)
        _check_upstream(settings.upstream_url)
        if not 0 < settings.port < 65536:
            raise ConfigError(f"port {settings.port} is not a TCP port (1 to 65535).")
        if settings.reconcile_every_seconds > 0 and settings.anthropic_admin_key is None:
            raise ConfigError(
                "SPENDGATE_RECONCILE_EVERY_SECONDS needs SPENDGATE_ANTHROPIC_ADMIN_KEY (an Anthropic Admin API key)."
            )
        if settings.workers < 1:
            raise ConfigError(f"workers {settings.workers}: at least one serving process is needed.")
        if not settings.head_timeout_seconds > 0:
            raise ConfigError(
                f"SPENDGATE_HEAD_TIMEOUT_SECONDS has value {settings.head_timeout_seconds:g}; it must be above 0."
            )
        if settings.device_poll_seconds < 1:
            raise ConfigError(f"SPENDGATE_DEVICE_POLL_SECONDS {settings.device_poll_seconds}: at least 1 second.")
        if settings.oidc is not None and settings.public_url is None:
            raise ConfigError(
                "SPENDGATE_OIDC_ISSUER needs SPENDGATE_PUBLIC_URL: the identity provider sends people back to "
                "<SPENDGATE_PUBLIC_URL>/dashboard/oidc/callback, registered with it exactly."
            )
        return settings


@dataclass(frozen=True, slots=True, kw_only=True)
class OidcSettings:
    """Where people sign in, and what of their identity counts: the issuer, this client, the claims used."""

    issuer: str
    client_id: str
    client_secret: str = field(repr=False)
    groups_claim: str = "groups"
    # Email domains allowed to sign in (lowercase); empty: any.
    allowed_domains: frozenset[str] = frozenset()
    # Members of any of these groups administer spendgate.
    admin_groups: frozenset[str] = frozenset()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> OidcSettings | None:
        """The `SPENDGATE_OIDC_*` settings, or None when no issuer is set."""
        issuer = (environ.get("SPENDGATE_OIDC_ISSUER") or "").rstrip("/")
        if not issuer:
            return None
        client_id = environ.get("SPENDGATE_OIDC_CLIENT_ID") or ""
        secret = environ.get("SPENDGATE_OIDC_CLIENT_SECRET") or ""
        if not client_id or not secret:
            raise ConfigError("SPENDGATE_OIDC_ISSUER needs SPENDGATE_OIDC_CLIENT_ID and SPENDGATE_OIDC_CLIENT_SECRET.")
        if not issuer.startswith("https://") and not _loopback(issuer):
            raise ConfigError(f"SPENDGATE_OIDC_ISSUER {issuer!r} must be https:// (plain http only on loopback).")
        return cls(
            issuer=issuer,
            client_id=client_id,
            client_secret=secret,
            groups_claim=environ.get("SPENDGATE_OIDC_GROUPS_CLAIM") or "groups",
            allowed_domains=frozenset(d.lower() for d in _names(environ.get("SPENDGATE_OIDC_ALLOWED_DOMAINS", ""))),
            admin_groups=_names(environ.get("SPENDGATE_OIDC_ADMIN_GROUPS", "")),
        )


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1")


def _check_upstream(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(
            f"upstream URL {url!r} is not an http(s) base URL (SPENDGATE_UPSTREAM_URL or --upstream), e.g. "
            "https://api.anthropic.com."
        )


def _address(raw: str) -> tuple[str, int]:
    host, colon, port = raw.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(raw)
    return host.strip("[]") or "127.0.0.1", int(port)


def _names(raw: str) -> frozenset[str]:
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


def _log_format(raw: str) -> LogFormat:
    if raw == "json":
        return "json"
    if raw == "text":
        return "text"
    raise ValueError(raw)


def _writer_mode(raw: str) -> WriterMode:
    if raw == "auto":
        return "auto"
    if raw == "process":
        return "process"
    if raw == "thread":
        return "thread"
    raise ValueError(raw)


def _boolean(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _fraction(raw: str) -> Decimal:
    try:
        value = Decimal(raw)
    except ArithmeticError:
        raise ValueError(raw) from None
    if not 0 < value <= 1:
        raise ValueError(raw)
    return value


def _read(environ: Mapping[str, str], name: str, cast: Callable[[str], T], default: T) -> T:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        kind = {
            "_boolean": "boolean (true/false)",
            "_fraction": "fraction between 0 and 1",
            "_address": "host:port address",
            "_log_format": "log format (text or json)",
            "_writer_mode": "ledger writer (auto, process or thread)",
        }.get(cast.__name__)
        raise ConfigError(f"{name} has value {raw!r}, which is not a valid {kind or cast.__name__}.") from None
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"{name} has value {raw!r}; it must not be negative.")
    return value
