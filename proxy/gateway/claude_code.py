"""Claude Code's `metadata.user_id`: who is calling, and in which session, when Claude Code is the client.

Claude Code sends `metadata.user_id` as a JSON object in a string, `{"device_id": …, "account_uuid": …,
"session_id": …}` (Anthropic's LLM gateway documentation; `account_uuid` is empty without a Claude account), and
its session part changes every session. Taken whole as the user, as any other client's user id is, every session
would be a new end user: a fresh allowance each time, and a person's spend scattered over as many rows as they had
sessions. So its stable part is the user and its session part the session; any other string is left to be the
user as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# Claude Code's own is about 150 characters (three ids): a much longer string is not its, and is never parsed.
MAX_USER_ID = 1024


@dataclass(frozen=True, slots=True)
class ClaudeCodeUserId:
    """What a Claude Code `metadata.user_id` says, as the client sent it (not yet made safe for the ledger)."""

    user: str | None  # `account_uuid` when non-empty, else `device_id`; None when both are empty
    session: str | None  # `session_id`; None when empty


def parse_user_id(user_id: str) -> ClaudeCodeUserId | None:
    """The stable user and the session of a Claude Code `metadata.user_id`; None for any other string.

    Strict, so no other client's id is taken apart by accident: a JSON object whose values are all strings, with a
    `session_id` and a `device_id` or an `account_uuid`. Only a string that starts with `{` is parsed at all."""
    if not user_id.startswith("{") or len(user_id) > MAX_USER_ID:
        return None
    try:
        fields = json.loads(user_id)
    except (ValueError, RecursionError):
        return None
    if (
        not isinstance(fields, dict)
        or "session_id" not in fields
        or ("account_uuid" not in fields and "device_id" not in fields)
        or not all(isinstance(value, str) for value in fields.values())
    ):
        return None
    return ClaudeCodeUserId(
        user=fields.get("account_uuid") or fields.get("device_id") or None, session=fields["session_id"] or None
    )
