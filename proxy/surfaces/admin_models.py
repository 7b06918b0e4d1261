"""The admin API's shapes: pydantic models that validate every request and describe every answer.

`/admin/openapi.json` is generated from these same models (`proxy/surfaces/admin/openapi.py`), so the document
cannot drift from what the API accepts. Money is an exact decimal: accepted as a JSON string or number (parsed
without floats), always answered as a string.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from proxy.ledger.windows import WINDOW_COLUMNS, WindowChange
from proxy.types import (
    CAP_POLICIES,
    GROUPS,
    PERIODS,
    UNSET,
    BudgetEdge,
    CapPolicy,
    Outcome,
    Period,
    PriceSource,
    RetryReason,
)

MAX_PAGE = 1000
# A money amount in a request: a finite decimal given as a string ("250.00") or a JSON number, never negative.
Money = Annotated[Decimal, Field(ge=0, allow_inf_nan=False, max_digits=24, decimal_places=12, examples=["250.00"])]


def _digits(value: object) -> object:
    # A query parameter is text: digits only (no sign, spaces, underscores or decimal point).
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError(f"must be a whole number from 1 to {MAX_PAGE}")
    return value


# How many rows a page holds, as a query parameter.
PageSize = Annotated[int, BeforeValidator(_digits), Field(ge=1, le=MAX_PAGE)]
# Counts stored in INTEGER columns.
Count = Annotated[StrictInt, Field(le=2**31 - 1)]
# A money amount in an answer: the exact decimal digits as a string.
MoneyText = Annotated[str, Field(pattern=r"^-?\d+(\.\d+)?$", examples=["12.345678"])]
# A rate limit per minute (an INTEGER column), or null: none.
PerMinute = Annotated[Count, Field(ge=1)] | None
ModelIds = Annotated[list[Annotated[StrictStr, Field(pattern=r"^\S{1,200}$")]], Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeamFields(_Strict):
    """A team's rules. In an update, a field present is set (null clears a limit) and a field absent is kept."""

    budget_usd: Money | None = Field(None, description="Spend limit per period in USD; null: none.")
    period: Period = Field("month", description=f"Budget period: {', '.join(PERIODS)}.")
    max_output_tokens: Annotated[Count, Field(ge=1)] | None = Field(
        None, description="Cap on max_tokens per call; null: the server default."
    )
    cap_policy: CapPolicy = Field("clamp", description=f"Over the cap: {' or '.join(CAP_POLICIES)}.")
    models: ModelIds | None = Field(None, description="Models allowed; null: every model.")
    retry_window_seconds: Annotated[Count, Field(ge=0)] = Field(
        600, description="How far back a repeat of the same request is linked as a retry; 0: off."
    )
    user_budget_usd: Money | None = Field(
        None, description="Each end user's spend limit per period in USD (overrides: user-budgets); null: none."
    )
    rpm: PerMinute = Field(None, description="Requests per minute; null: no limit.")
    itpm: PerMinute = Field(None, description="Input tokens (uncached and cache writes) per minute; null: no limit.")
    otpm: PerMinute = Field(None, description="Output tokens per minute; null: no limit.")
    daily_budget_usd: Money | None = Field(None, description="Spend limit per UTC day, besides the others; null: none.")
    weekly_budget_usd: Money | None = Field(None, description="Spend limit per week (from Monday); null: none.")
    monthly_budget_usd: Money | None = Field(None, description="Spend limit per calendar month; null: none.")
    user_daily_budget_usd: Money | None = Field(None, description="Each end user's spend limit per day; null: none.")
    user_weekly_budget_usd: Money | None = Field(None, description="Each end user's spend limit per week; null: none.")
    user_monthly_budget_usd: Money | None = Field(
        None, description="Each end user's spend limit per month; null: none."
    )
    budget_edge: BudgetEdge = Field(
        "refuse",
        description="A call worth more than a window has left: refuse it, or clamp its max_tokens to what fits.",
    )

    def given(self) -> dict[str, Any]:
        """Only the fields the client sent, as `TeamSettings` keyword arguments."""
        fields = {name: getattr(self, name) for name in self.model_fields_set}
        if fields.get("models") is not None:
            fields["models"] = tuple(fields["models"])
        windows, user_windows = _windows(fields), _windows(fields, "user_")
        return {**fields, "windows": windows or None, "user_windows": user_windows or None}


class TeamCreate(TeamFields):
    """`POST /admin/teams`."""

    name: StrictStr = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="Unique: letters, digits, '-', '_', '.'."
    )


class _Windows(_Strict):
    """Budget windows held besides the shorthand budget (a field absent is not set)."""

    daily_budget_usd: Money | None = Field(None, description="Spend limit per UTC day; null: none.")
    weekly_budget_usd: Money | None = Field(None, description="Spend limit per week, from Monday; null: none.")
    monthly_budget_usd: Money | None = Field(None, description="Spend limit per calendar month; null: none.")

    def windows(self) -> dict[Period, Decimal | None]:
        """The windows the client sent."""
        return _windows({name: getattr(self, name) for name in self.model_fields_set})


class KeyCreate(_Windows):
    """`POST /admin/teams/{name}/keys`."""

    name: StrictStr | None = Field(None, max_length=200, description="A label for people; not secret.")
    budget_usd: Money | None = Field(None, description="The key's own spend limit per period in USD; null: none.")
    period: Period = Field("month", description=f"Budget period: {', '.join(PERIODS)}.")
    rpm: PerMinute = Field(None, description="The key's own requests per minute; null: no limit.")
    itpm: PerMinute = Field(None, description="The key's own input tokens per minute; null: no limit.")
    otpm: PerMinute = Field(None, description="The key's own output tokens per minute; null: no limit.")
    expires_days: int | None = Field(None, ge=1, le=3650, description="Days until the key stops working; null: never.")


class KeyUpdate(_Windows):
    """`PATCH /admin/keys/{key_id}`: a field present is set (null clears the limit), a field absent is kept."""

    rpm: PerMinute = Field(None, description="Requests per minute.")
    itpm: PerMinute = Field(None, description="Input tokens per minute.")
    otpm: PerMinute = Field(None, description="Output tokens per minute.")
    budget_usd: Money | None = Field(None, description="The key's own spend limit per period in USD; null: none.")
    period: Period = Field("month", description="The period of budget_usd (given alone, moves the budget there).")

    def rates(self) -> dict[str, Any]:
        """Only the rate limits the client sent."""
        return {name: getattr(self, name) for name in self.model_fields_set & {"rpm", "itpm", "otpm"}}

    def budget(self) -> WindowChange | None:
        """The budget windows the client sent, if any."""
        change = WindowChange(
            budget=self.budget_usd if "budget_usd" in self.model_fields_set else UNSET,
            period=self.period if "period" in self.model_fields_set else UNSET,
            windows=self.windows(),
        )
        return None if change.empty else change


class UserBudgetSet(_Windows):
    """`PUT /admin/teams/{name}/user-budgets`: one end user's own budget."""

    user: StrictStr = Field(max_length=256, description='The end user; "" names the calls without a user.')
    budget_usd: Money | None = Field(None, description="Their spend limit per team period in USD; null: no limit.")

    @model_validator(mode="after")
    def _some_budget(self) -> UserBudgetSet:
        if not self.model_fields_set - {"user"}:
            raise ValueError("give budget_usd or a window (daily_budget_usd, weekly_budget_usd, monthly_budget_usd)")
        return self


def _windows(fields: dict[str, Any], prefix: str = "") -> dict[Period, Decimal | None]:
    """The budget windows among fields sent (`daily_budget_usd` & co. after `prefix`), taken out of `fields`."""
    found: dict[Period, Decimal | None] = {}
    for period, column in WINDOW_COLUMNS.items():
        if f"{prefix}{column}" in fields:
            found[period] = fields.pop(f"{prefix}{column}")
    return found


class UserQuery(_Strict):
    """`DELETE /admin/teams/{name}/user-budgets` query parameters."""

    user: str = Field(max_length=256, description='The end user whose own budget ends ("" for calls without one).')


class GroupMap(_Strict):
    """`PUT /admin/teams/{name}/groups`: members of an identity-provider group belong to the team."""

    group: StrictStr = Field(
        min_length=1, max_length=256, description="The group as the provider's groups claim names it."
    )


class GroupQuery(_Strict):
    """`DELETE /admin/teams/{name}/groups` query parameters."""

    group: str = Field(
        min_length=1, max_length=256, description="The group whose members no longer belong to the team."
    )


class Groups(_Strict):
    """The identity-provider groups whose members belong to a team."""

    team: str
    groups: list[str]


class UsageQuery(_Strict):
    """`GET /admin/usage` query parameters."""

    team: str | None = Field(None, description="Only this team's records.")
    session: str | None = Field(None, description="Only this agent session's records.")
    since: str | None = Field(None, description="ISO 8601 date or time (UTC without a zone), inclusive.")
    until: str | None = Field(None, description="ISO 8601 date or time, exclusive.")
    limit: PageSize = Field(100, description="Records per page (digits only).")
    cursor: str | None = Field(None, description="`next_cursor` of the previous page.")


class ReportQuery(_Strict):
    """`GET /admin/report` query parameters."""

    by: str = Field("", description=f"Comma-separated groups, any of: {', '.join(GROUPS)}; empty: one total.")
    since: str | None = Field(None, description="ISO 8601 date or time, inclusive.")
    until: str | None = Field(None, description="ISO 8601 date or time, exclusive.")
    limit: PageSize | None = Field(
        None, description="Groups per page (digits only); absent: every group, or 100 when `cursor` is given."
    )
    cursor: str | None = Field(None, description="`next_cursor` of the previous page, with the same `by` and times.")

    @field_validator("by")
    @classmethod
    def _known_groups(cls, value: str) -> str:
        unknown = [name for name in _groups(value) if name not in GROUPS]
        if unknown:
            raise ValueError(f"unknown group {unknown[0]!r}; use any of {', '.join(GROUPS)}")
        return value

    def groups(self) -> list[str]:
        """The groups asked for, in order."""
        return _groups(self.by)


def _groups(by: str) -> list[str]:
    return [name.strip() for name in by.split(",") if name.strip()]


class Team(_Strict):
    """A team with its spend in the current period."""

    name: str
    budget_usd: MoneyText | None
    period: Period
    max_output_tokens: int | None
    cap_policy: CapPolicy
    models: list[str] | None
    retry_window_seconds: int
    user_budget_usd: MoneyText | None
    rpm: int | None
    itpm: int | None
    otpm: int | None
    spent_usd: MoneyText
    reserved_usd: MoneyText = Field(description="Held by calls in flight and by replicas' budget leases.")
    remaining_usd: MoneyText | None
    period_start: str | None = Field(description="Start of the current period (null for `total`).")
    windows: list[Window] = Field(description="Every budgeted window, the shorthand's (budget_usd, period) among them.")
    user_windows: dict[str, MoneyText] = Field(description="Each end user's allowance per window (daily, ...).")
    budget_edge: BudgetEdge


class Window(_Strict):
    """One budget window: its allowance, spend and holds in it now, and when it resets."""

    window: Literal["daily", "weekly", "monthly", "total"]
    period: Period
    budget_usd: MoneyText
    spent_usd: MoneyText
    reserved_usd: MoneyText
    remaining_usd: MoneyText
    period_start: str
    resets_at: str | None = Field(description="When the window starts afresh (null for `total`).")


class Teams(_Strict):
    data: list[Team]


class Key(_Strict):
    """A client key; never the key itself."""

    id: str
    team: str
    name: str | None
    prefix: str = Field(description="The key's first characters, to recognise it.")
    budget_usd: MoneyText | None
    period: Period
    rpm: int | None
    itpm: int | None
    otpm: int | None
    created_at: str
    revoked_at: str | None
    key_owner: str | None = Field(
        description="The person a personal key belongs to (`oidc:<sub>`): its calls are theirs."
    )
    expires_at: str | None = Field(description="When the key stops working (null: never).")
    windows: dict[str, MoneyText] = Field(description="The key's own allowance per window (daily, ...).")


class KeyCreated(Key):
    key: str = Field(description="The key itself: shown once, never again.")


class Keys(_Strict):
    data: list[Key]


class User(_Strict):
    """One end user of a team this period, against their allowance."""

    user: str = Field(description='"" for the calls that carry no user.')
    budget_usd: MoneyText | None = Field(description="Their allowance per period (null: no limit).")
    own_budget: bool = Field(description="Set for this user rather than the team's per-user budget.")
    spent_usd: MoneyText
    reserved_usd: MoneyText
    remaining_usd: MoneyText | None
    windows: list[Window] = Field(description="Their budgeted windows, with spend and holds in each.")


class Users(_Strict):
    data: list[User]


class UsageRecord(_Strict):
    """One usage record: the fields `spendgate usage` and `GET /admin/usage` give for each call."""

    id: str
    started_at: str
    finished_at: str
    team: str | None
    key_id: str | None
    feature: str | None
    user: str | None
    session: str | None
    agent: str | None
    parent_agent: str | None
    endpoint: str
    model: str | None
    response_model: str | None
    upstream_request_id: str | None
    status: int
    outcome: Outcome
    error_type: str | None
    streamed: bool
    batch_id: str | None
    custom_id: str | None
    input_tokens: int
    output_tokens: int
    cache_creation_5m_input_tokens: int
    cache_creation_1h_input_tokens: int
    cache_read_input_tokens: int
    web_search_requests: int
    web_fetch_requests: int
    service_tier: str | None
    speed: str | None
    inference_geo: str | None
    cost_usd: MoneyText | None
    price_version: str
    price_source: PriceSource
    cost_source: Literal["estimate"] | None
    is_retry: bool
    retry_reason: RetryReason | None
    retry_of: str | None
    retry_count: int
    attempt: int
    max_tokens_requested: int | None
    max_tokens_sent: int | None
    latency_ms: float
    ttfb_ms: float | None
    repriced_from_cost_usd: MoneyText | None = Field(description="What a reprice replaced, if one did.")
    repriced_from_price_version: str | None


class UsagePage(_Strict):
    data: list[UsageRecord]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class ReportRow(_Strict):
    """Totals of one group: the group's fields (those asked for), then the sums."""

    team: str | None = None
    model: str | None = None
    feature: str | None = None
    user: str | None = None
    session: str | None = None
    agent: str | None = None
    key: str | None = None
    day: str | None = None
    calls: int
    input_tokens: int
    output_tokens: int
    cache_creation_5m_input_tokens: int
    cache_creation_1h_input_tokens: int
    cache_read_input_tokens: int
    web_search_requests: int
    cost_usd: MoneyText
    retries: int
    retry_cost_usd: MoneyText
    retry_share: MoneyText
    unpriced_calls: int
    family_priced_calls: int
    cache_savings_usd: MoneyText
    batch_savings_usd: MoneyText


class Report(_Strict):
    data: list[ReportRow]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class ErrorDetail(_Strict):
    type: str = Field(examples=["invalid_request_error"])
    message: str


class Error(_Strict):
    """Every refusal, in Anthropic's error shape."""

    type: Literal["error"]
    error: ErrorDetail


class Document(BaseModel):
    """An OpenAPI 3.1 document."""

    model_config = ConfigDict(extra="allow")
    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
