"""The admin routes for teams, their keys, their end users' budgets and the identity-provider groups that are
their members."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.ledger.end_users import list_users, set_user_budget
from proxy.ledger.groups import groups_of, map_group
from proxy.ledger.key_admin import create_key, list_keys, revoke_key, rotate_key, update_key
from proxy.ledger.keys import KeyCache
from proxy.ledger.teams import TeamSettings, create_team, get_team, list_teams, update_team
from proxy.ledger.windows import WindowChange
from proxy.surfaces.admin.requests import Operation, actor, json_body, on_ledger
from proxy.surfaces.admin_models import (
    GroupMap,
    GroupQuery,
    Groups,
    Key as KeyOut,
    KeyCreate,
    KeyCreated,
    Keys,
    KeyUpdate,
    Team as TeamOut,
    TeamCreate,
    TeamFields,
    Teams,
    User as UserOut,
    UserBudgetSet,
    UserQuery,
    Users,
)
from proxy.types import UNSET, RateLimits


async def _create_team(request: Request) -> Response:
    body = TeamCreate.model_validate(await json_body(request))
    fields = body.given()
    fields.pop("name", None)
    settings = TeamSettings(**fields)
    view = await on_ledger(request, lambda engine: create_team(engine, body.name, settings, actor=actor(request)))
    return JSONResponse(view.to_json(), status_code=201)


async def _list_teams(request: Request) -> Response:
    views = await on_ledger(request, list_teams)
    return JSONResponse({"data": [view.to_json() for view in views]})


async def _get_team(request: Request) -> Response:
    name = request.path_params["name"]
    view = await on_ledger(request, lambda engine: get_team(engine, name))
    return JSONResponse(view.to_json())


async def _update_team(request: Request) -> Response:
    name = request.path_params["name"]
    settings = TeamSettings(**TeamFields.model_validate(await json_body(request)).given())
    view = await on_ledger(request, lambda engine: update_team(engine, name, settings, actor=actor(request)))
    return JSONResponse(view.to_json())


async def _create_key(request: Request) -> Response:
    team = request.path_params["name"]
    body = KeyCreate.model_validate(await json_body(request))
    view, key = await on_ledger(
        request,
        lambda engine: create_key(
            engine,
            team,
            actor=actor(request),
            name=body.name,
            budget_usd=body.budget_usd,
            period=body.period,
            windows=body.windows(),
            rates=RateLimits(rpm=body.rpm, itpm=body.itpm, otpm=body.otpm),
            expires_days=body.expires_days,
        ),
    )
    return JSONResponse({**view.to_json(), "key": key}, status_code=201)


async def _rotate_key(request: Request) -> Response:
    key_id = request.path_params["key_id"]
    view, key = await on_ledger(request, lambda engine: rotate_key(engine, key_id, actor=actor(request)))
    keys: KeyCache = request.state.keys
    keys.forget(key_id)
    return JSONResponse({**view.to_json(), "key": key}, status_code=201)


async def _list_groups(request: Request) -> Response:
    team = request.path_params["name"]
    groups = await on_ledger(request, lambda engine: groups_of(engine, team))
    return JSONResponse({"team": team, "groups": groups})


async def _map_group(request: Request) -> Response:
    team = request.path_params["name"]
    group = GroupMap.model_validate(await json_body(request)).group
    groups = await on_ledger(request, lambda engine: map_group(engine, team, group, actor=actor(request)))
    return JSONResponse({"team": team, "groups": groups})


async def _unmap_group(request: Request) -> Response:
    team = request.path_params["name"]
    group = GroupQuery.model_validate(dict(request.query_params)).group
    groups = await on_ledger(request, lambda engine: map_group(engine, team, group, actor=actor(request), remove=True))
    return JSONResponse({"team": team, "groups": groups})


async def _list_keys(request: Request) -> Response:
    team = request.path_params["name"]
    await on_ledger(request, lambda engine: get_team(engine, team))
    views = await on_ledger(request, lambda engine: list_keys(engine, team=team))
    return JSONResponse({"data": [view.to_json() for view in views]})


async def _revoke_key(request: Request) -> Response:
    key_id = request.path_params["key_id"]
    view = await on_ledger(request, lambda engine: revoke_key(engine, key_id, actor=actor(request)))
    keys: KeyCache = request.state.keys
    # This replica refuses the key at once; the others within their key-cache lifetime.
    keys.forget(key_id)
    return JSONResponse(view.to_json())


async def _update_key(request: Request) -> Response:
    key_id = request.path_params["key_id"]
    body = KeyUpdate.model_validate(await json_body(request))
    view = await on_ledger(
        request, lambda engine: update_key(engine, key_id, actor=actor(request), budget=body.budget(), **body.rates())
    )
    keys: KeyCache = request.state.keys
    keys.forget(key_id)
    return JSONResponse(view.to_json())


async def _list_users(request: Request) -> Response:
    team = request.path_params["name"]
    views = await on_ledger(request, lambda engine: list_users(engine, team))
    return JSONResponse({"data": [view.to_json() for view in views]})


async def _set_user_budget(request: Request) -> Response:
    team = request.path_params["name"]
    body = UserBudgetSet.model_validate(await json_body(request))
    budget = body.budget_usd if "budget_usd" in body.model_fields_set else UNSET
    change = WindowChange(budget=budget, windows=body.windows())
    view = await on_ledger(
        request, lambda engine: set_user_budget(engine, team, body.user, change, actor=actor(request))
    )
    return JSONResponse(view.to_json())


async def _clear_user_budget(request: Request) -> Response:
    team = request.path_params["name"]
    query = UserQuery.model_validate(dict(request.query_params))
    view = await on_ledger(
        request, lambda engine: set_user_budget(engine, team, query.user, None, actor=actor(request))
    )
    return JSONResponse(view.to_json())


TEAM_OPERATIONS = (
    Operation(
        method="POST",
        path="/admin/teams",
        handler=_create_team,
        summary="Create a team",
        body=TeamCreate,
        answer=TeamOut,
        status=201,
        errors=(400, 409),
    ),
    Operation(
        method="GET", path="/admin/teams", handler=_list_teams, summary="List teams with their spend", answer=Teams
    ),
    Operation(
        method="GET",
        path="/admin/teams/{name}",
        handler=_get_team,
        summary="One team with its spend",
        answer=TeamOut,
        errors=(404,),
    ),
    Operation(
        method="PATCH",
        path="/admin/teams/{name}",
        handler=_update_team,
        summary="Change a team's rules",
        body=TeamFields,
        answer=TeamOut,
        errors=(400, 404),
    ),
    Operation(
        method="POST",
        path="/admin/teams/{name}/keys",
        handler=_create_key,
        summary="Create a client key",
        body=KeyCreate,
        answer=KeyCreated,
        status=201,
        errors=(400, 404),
    ),
    Operation(
        method="GET",
        path="/admin/teams/{name}/keys",
        handler=_list_keys,
        summary="List a team's keys",
        answer=Keys,
        errors=(404,),
    ),
    Operation(
        method="DELETE",
        path="/admin/keys/{key_id}",
        handler=_revoke_key,
        summary="Revoke a key",
        answer=KeyOut,
        errors=(404,),
    ),
    Operation(
        method="POST",
        path="/admin/keys/{key_id}/rotate",
        handler=_rotate_key,
        summary="Replace a key with a new one (same team, owner, limits, lifetime); the old one is revoked",
        answer=KeyCreated,
        status=201,
        errors=(404,),
    ),
    Operation(
        method="GET",
        path="/admin/teams/{name}/groups",
        handler=_list_groups,
        summary="The identity-provider groups whose members belong to the team",
        answer=Groups,
        errors=(404,),
    ),
    Operation(
        method="PUT",
        path="/admin/teams/{name}/groups",
        handler=_map_group,
        summary="Make an identity-provider group's members members of the team",
        body=GroupMap,
        answer=Groups,
        errors=(400, 404),
    ),
    Operation(
        method="DELETE",
        path="/admin/teams/{name}/groups",
        handler=_unmap_group,
        summary="A group's members no longer belong to the team",
        query=GroupQuery,
        answer=Groups,
        errors=(400, 404),
    ),
    Operation(
        method="PATCH",
        path="/admin/keys/{key_id}",
        handler=_update_key,
        summary="Change a key's rate limits",
        body=KeyUpdate,
        answer=KeyOut,
        errors=(400, 404),
    ),
    Operation(
        method="GET",
        path="/admin/teams/{name}/users",
        handler=_list_users,
        summary="A team's end users this period, against their allowance",
        answer=Users,
        errors=(404,),
    ),
    Operation(
        method="PUT",
        path="/admin/teams/{name}/user-budgets",
        handler=_set_user_budget,
        summary="Give one end user their own budget",
        body=UserBudgetSet,
        answer=UserOut,
        errors=(400, 404),
    ),
    Operation(
        method="DELETE",
        path="/admin/teams/{name}/user-budgets",
        handler=_clear_user_budget,
        summary="End a user's own budget (the team's per-user budget applies again)",
        query=UserQuery,
        answer=UserOut,
        errors=(400, 404),
    ),
)
