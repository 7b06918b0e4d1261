"""People and the teams their identity-provider groups map to.

A person is known by the subject their provider vouches for (`oidc:<sub>`), recorded at each sign-in with the
groups the provider named then. Which teams they belong to is read from those groups and `group_teams` at every
request, so mapping a group (`spendgate teams map-group`) takes effect at once; a change of groups in the provider
takes effect at the person's next sign-in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from proxy.ledger.audit import record_event
from proxy.ledger.db import write_transaction
from proxy.ledger.schema import GroupTeam, Person, Team
from proxy.ledger.teams import NotFound, no_team

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


def map_group(engine: Engine, team: str, group: str, *, actor: str, remove: bool = False) -> list[str]:
    """Make members of provider group `group` members of `team` (or no longer, with `remove`); returns the team's
    groups after the change."""
    group = group.strip()
    if not group or len(group) > MAX_GROUP_LENGTH:
        raise ValueError(f"a group name is 1 to {MAX_GROUP_LENGTH} characters, got {len(group)}")
    with write_transaction(engine) as connection:
        team_id = connection.execute(select(Team.id).where(Team.name == team)).scalar()
        if team_id is None:
            raise no_team(connection, team)
        mapped = connection.execute(
            select(GroupTeam.group).where(GroupTeam.team_id == team_id, GroupTeam.group == group)
        ).first()
        if remove and mapped is not None:
            connection.execute(delete(GroupTeam).where(GroupTeam.team_id == team_id, GroupTeam.group == group))
            record_event(connection, actor=actor, action="team.unmap_group", target=team, before={"group": group})
        elif remove:
            raise NotFound(f"group {group!r} is not mapped to team {team!r}")
        elif mapped is None:
            connection.execute(insert(GroupTeam).values(group=group, team_id=team_id))
            record_event(connection, actor=actor, action="team.map_group", target=team, after={"group": group})
        return groups_of_team(connection, team_id)


def groups_of(engine: Engine, team: str) -> list[str]:
    """The provider groups mapped to the team named `team` (`NotFound` if there is none)."""
    with engine.connect() as connection:
        team_id = connection.execute(select(Team.id).where(Team.name == team)).scalar()
        if team_id is None:
            raise no_team(connection, team)
        return groups_of_team(connection, team_id)


def groups_of_team(connection: Connection, team_id: int) -> list[str]:
    """The provider groups mapped to a team, sorted."""
    query = select(GroupTeam.group).where(GroupTeam.team_id == team_id).order_by(GroupTeam.group)
    return list(connection.execute(query).scalars())


def clean_groups(claim: object) -> tuple[str, ...]:
    """The group names in an id_token's groups claim: a list of strings (or one string); anything else is none."""
    if isinstance(claim, str):
        claim = [claim]
    if not isinstance(claim, list) or len(claim) > MAX_GROUPS:
        return ()
    return tuple(sorted({g for g in claim if isinstance(g, str) and 0 < len(g) <= MAX_GROUP_LENGTH}))
