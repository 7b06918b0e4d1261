"""Identity-provider groups as teams: `spendgate teams map-group TEAM GROUP` makes the group's members members of
the team (proxy/ledger/people.py reads who they are), each change with an audit entry."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, delete, insert, select

from proxy.ledger.audit import record_event
from proxy.ledger.db import write_transaction
from proxy.ledger.people import MAX_GROUP_LENGTH
from proxy.ledger.schema import GroupTeam, Team
from proxy.ledger.teams import NotFound, no_team


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
