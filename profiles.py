"""The public routes: a user's public profile (the study note's get_user_by_username), and the list."""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from openapi import Operation
from responses import Page, PublicProfile, model_response
from schemas import USERNAME_PATTERN, ListQuery
from stores import UserStore

USERNAME = re.compile(USERNAME_PATTERN)


async def get_user(request: Request) -> Response:
    username: str = request.path_params["username"]
    # No stored username is anything else (signup's rule), so nothing can match; and PostgreSQL
    # could not even compare a string with a NUL byte in it.
    possible = USERNAME.fullmatch(username) is not None
    user = await UserStore(request.state.session).public_by_username(username) if possible else None
    if user is None:
        raise HTTPException(404, "User not found")
    return model_response(PublicProfile.model_validate(user))


async def list_users(request: Request) -> Response:
    query = ListQuery.model_validate(dict(request.query_params))
    users = await UserStore(request.state.session).list_page(after=query.after, limit=query.limit + 1)
    items = [PublicProfile.model_validate(user) for user in users[: query.limit]]
    more = len(users) > query.limit
    return model_response(Page(items=items, next=items[-1].username if more else None))


OPERATIONS = (
    Operation(
        "GET", "/api/users", list_users, "listUsers", "Public profiles by username", "profiles", 200, Page, (400,),
        query=ListQuery,
    ),
    Operation(
        "GET", "/api/users/{username}", get_user, "getUser", "A public profile", "profiles", 200, PublicProfile,
        (404,),
    ),
)  # fmt: skip
