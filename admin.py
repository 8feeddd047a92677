"""The routes operators call: the admin API under /api/admin (an administrator's access token; the
same actions as manage.py, in operations.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

import operations
from audit import AuditStore
from auth import authenticate
from db import DBSession
from models import User
from openapi import Operation
from responses import AdminPage, AdminUser, EventPage, event_page, model_response
from schemas import AdminEventsQuery, AdminUsersQuery
from stores import UserStore

Action = Callable[[DBSession, User, str, Request], Awaitable[str]]


async def administrator(request: Request) -> User:
    """The user of the request's access token, if an administrator now (a 401 without a good
    token, a 403 for anyone else)."""
    user, _ = await authenticate(request, "access")
    if not user.is_admin:
        raise HTTPException(403, "This takes an administrator.")
    return user


async def named_user(request: Request) -> User:
    user = await UserStore(request.state.session).get_by_username(request.path_params["username"])
    if user is None:
        raise HTTPException(404, "User not found")
    return user


async def list_users(request: Request) -> Response:
    query = AdminUsersQuery.model_validate(dict(request.query_params))
    await administrator(request)
    users = await UserStore(request.state.session).admin_page(after=query.after, limit=query.limit + 1, prefix=query.q)
    items = [AdminUser.model_validate(user) for user in users[: query.limit]]
    return model_response(AdminPage(items=items, next=items[-1].username if len(users) > query.limit else None),
                          private=True)  # fmt: skip


async def get_user(request: Request) -> Response:
    await administrator(request)
    return model_response(AdminUser.model_validate(await named_user(request)), private=True)


def acting(action: Action, *, not_on_self: str | None = None) -> Callable[[Request], Awaitable[Response]]:
    """A route doing `action` to the user its path names, as the administrator who asks; 409 for
    `not_on_self` actions on their own account (an operator must not lock themselves out)."""

    async def endpoint(request: Request) -> Response:
        admin, user = await administrator(request), await named_user(request)
        if not_on_self and user.id == admin.id:
            raise HTTPException(409, f"You cannot {not_on_self} your own account.")
        await action(request.state.session, user, admin.username, request)
        return Response(status_code=204)

    return endpoint


async def list_events(request: Request) -> Response:
    query = AdminEventsQuery.model_validate(dict(request.query_params))
    await administrator(request)
    store = AuditStore(request.state.session)
    events = await store.page(username=query.user, event=query.event, after=query.after, limit=query.limit + 1)
    return model_response(event_page(events, query.limit), private=True)


USER = "/api/admin/users/{username}"
NOT_ADMIN = {403: "You are not an administrator.", 404: "No such user."}
OPERATIONS = (
    Operation(
        "GET", "/api/admin/users", list_users, "adminListUsers",
        "Every user, private fields included, by username; q: a username or email prefix", "admin", 200, AdminPage,
        (400, 401, 403), query=AdminUsersQuery, auth=True, error_notes=NOT_ADMIN,
    ),
    Operation(
        "GET", USER, get_user, "adminGetUser", "One user, private fields included", "admin", 200, AdminUser,
        (401, 403, 404), auth=True, error_notes=NOT_ADMIN,
    ),
    Operation(
        "DELETE", USER, acting(operations.delete, not_on_self="delete"), "adminDeleteUser", "Delete a user",
        "admin", 204, None, (401, 403, 404, 409), auth=True,
        error_notes={**NOT_ADMIN, 409: "An operator cannot delete their own account here."},
    ),
    Operation(
        "POST", f"{USER}/disable", acting(operations.disable, not_on_self="disable"), "adminDisableUser",
        "Disable a user: every session ends; its signin answers 403 after the right password", "admin", 204, None,
        (401, 403, 404, 409), auth=True,
        error_notes={**NOT_ADMIN, 409: "An operator cannot disable their own account."},
    ),
    Operation(
        "POST", f"{USER}/enable", acting(operations.enable), "adminEnableUser", "Enable a disabled user", "admin",
        204, None, (401, 403, 404), auth=True, error_notes=NOT_ADMIN,
    ),
    Operation(
        "POST", f"{USER}/end-sessions", acting(operations.end_sessions), "adminEndSessions",
        "End every session of a user", "admin", 204, None, (401, 403, 404), auth=True, error_notes=NOT_ADMIN,
    ),
    Operation(
        "GET", "/api/admin/events", list_events, "adminListEvents",
        "The security trail, newest first; user: a username, event: a kind", "admin", 200, EventPage,
        (400, 401, 403), query=AdminEventsQuery, auth=True, error_notes={403: NOT_ADMIN[403]},
    ),
)  # fmt: skip
