"""People: who signed in, with which provider groups, and the teams those groups make them members of.

A person is known by the subject their provider vouches for (`oidc:<sub>`), recorded at each sign-in with the
groups the provider named then. Which teams they belong to is read from those groups and `group_teams`
(proxy/ledger/groups.py) whenever it matters, so mapping a group takes effect at once; a change of groups in the
provider takes effect at the person's next sign-in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from proxy.ledger.db import write_transaction
from proxy.ledger.schema import GroupTeam, Person, Team

# The `user` of a person's calls and the actor of their acts: `oidc:<sub>`.
PERSON_PREFIX = "oidc:"
# Provider groups are free text; past these bounds a claim is not a list of group names.
MAX_GROUPS = 500
MAX_GROUP_LENGTH = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class PersonView:
    """A person as of their last sign-in."""

    subject: str
    email: str | None
    name: str | None
    groups: tuple[str, ...]


def subject_of(sub: str) -> str:
    """The ledger's name for the provider's subject `sub`: the `user` of their calls and the actor of their acts."""
    return PERSON_PREFIX + sub


def record_sign_in(engine: Engine, person: PersonView) -> None:
    """Remember who signed in and their groups now (blocking)."""
    now = datetime.now(UTC)
    columns = {"email": person.email, "name": person.name, "groups": json.dumps(list(person.groups))}
    for attempt in range(2):
        try:
            with write_transaction(engine) as connection:
                known = connection.execute(
                    update(Person).where(Person.subject == person.subject).values(**columns, last_seen_at=now)
                )
                if known.rowcount == 0:
                    connection.execute(
                        insert(Person).values(subject=person.subject, **columns, first_seen_at=now, last_seen_at=now)
                    )
            return
        except IntegrityError:
            # Their first sign-in, twice at once (two tabs, two replicas): the other one made the row; update it.
            if attempt:
                raise


def get_person(engine: Engine, subject: str) -> PersonView | None:
    """A person by subject, or None if they never signed in (blocking)."""
    with engine.connect() as connection:
        row = connection.execute(
            select(Person.email, Person.name, Person.groups).where(Person.subject == subject)
        ).first()
    if row is None:
        return None
    return PersonView(subject=subject, email=row.email, name=row.name, groups=tuple(json.loads(row.groups)))


def teams_of_groups(connection: Connection, groups: tuple[str, ...]) -> list[str]:
    """The names of the teams any of `groups` maps to, sorted."""
    if not groups:
        return []
    query = (
        select(Team.name)
        .join(GroupTeam, GroupTeam.team_id == Team.id)
        .where(GroupTeam.group.in_(groups))
        .distinct()
        .order_by(Team.name)
    )
    return list(connection.execute(query).scalars())


def is_member(connection: Connection, subject: str, team_id: int) -> bool:
    """Whether the person `subject` belongs to the team, as of their last sign-in's groups and today's mappings."""
    groups = connection.execute(select(Person.groups).where(Person.subject == subject)).scalar()
    if groups is None:
        return False
    query = select(GroupTeam.group).where(GroupTeam.team_id == team_id, GroupTeam.group.in_(json.loads(groups)))
    return connection.execute(query.limit(1)).first() is not None


def signed_in_since(connection: Connection, subject: str, since: datetime) -> bool:
    """Whether the person `subject` signed in at `since` or later."""
    seen = connection.execute(select(Person.last_seen_at).where(Person.subject == subject)).scalar()
    return seen is not None and seen >= since


def clean_groups(claim: object) -> tuple[str, ...]:
    """The group names in an id_token's groups claim: a list of strings (or one string); anything else is none."""
    if isinstance(claim, str):
        claim = [claim]
    if not isinstance(claim, list) or len(claim) > MAX_GROUPS:
        return ()
    return tuple(
        sorted({g for g in claim if isinstance(g, str) and 0 < len(g) <= MAX_GROUP_LENGTH and "\x00" not in g})
    )
