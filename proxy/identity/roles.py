"""Who a signed-in browser is and what they may do.

Two roles. An admin (signed in with the break-glass admin token, or a person in one of
`SPENDGATE_OIDC_ADMIN_GROUPS`) sees and changes everything. A person sees the teams their provider groups map to
and their own spend, and manages their own keys on those teams; another team's pages and another person's keys do
not exist for them (404, so that probing names learns nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from proxy.ledger.people import get_person, teams_of_groups
from proxy.ledger.web_sessions import ADMIN_TOKEN_ACTOR, find_session


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """The one behind a session: their audit name, their role, their teams."""

    actor: str
    csrf: str
    is_admin: bool
    teams: tuple[str, ...] = ()
    email: str | None = None
    name: str | None = None

    @property
    def is_person(self) -> bool:
        """Whether a person (not the shared admin token) is signed in: only a person owns keys."""
        return self.actor != ADMIN_TOKEN_ACTOR

    def may_see(self, team: str) -> bool:
        """Whether this principal may see the team's page and usage."""
        return self.is_admin or team in self.teams


def principal_of(
    engine: Engine, cookie: str | None, *, admin_token: str | None, admin_groups: frozenset[str]
) -> Principal | None:
    """The principal a session cookie stands for, or None (no session, or it ended): blocking, one or two reads."""
    session = find_session(engine, cookie, admin_token=admin_token)
    if session is None:
        return None
    if session.actor == ADMIN_TOKEN_ACTOR:
        return Principal(actor=session.actor, csrf=session.csrf, is_admin=True)
    person = get_person(engine, session.actor)
    if person is None:
        return None
    with engine.connect() as connection:
        teams = tuple(teams_of_groups(connection, person.groups))
    return Principal(
        actor=session.actor,
        csrf=session.csrf,
        is_admin=bool(admin_groups.intersection(person.groups)),
        teams=teams,
        email=person.email,
        name=person.name,
    )
