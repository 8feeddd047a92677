"""The strongest peer: Litestar with advanced-alchemy's Litestar plugin, set up as its documentation
does (a `db_session` dependency per request, the "autocommit" before-send handler, which commits
on a 2xx and rolls back otherwise), the service's pool size, the same lookups and models.

Bench only. Litestar 2.25.0 and advanced-alchemy 1.12.0 (requirements-bench.txt).
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import anyio.to_thread
import jwt
from advanced_alchemy.extensions.litestar import (
    AsyncSessionConfig,
    EngineConfig,
    SQLAlchemyAsyncConfig,
    SQLAlchemyPlugin,
)
from litestar import Litestar, Request, get, post
from litestar.exceptions import NotFoundException
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from engine import async_url
from models import User, email_key
from passwords import argon2id

hasher = argon2id()  # the service's parameters: the same hash costs the same everywhere

limiter = anyio.CapacityLimiter(os.cpu_count() or 1)
alchemy = SQLAlchemyAsyncConfig(
    connection_string=async_url(os.environ["DATABASE_URL"]).render_as_string(hide_password=False),
    engine_config=EngineConfig(pool_size=10, max_overflow=0),
    session_config=AsyncSessionConfig(expire_on_commit=False),
    before_send_handler="autocommit",
)


def public(user: User | None) -> dict[str, Any]:
    if user is None:
        raise NotFoundException("User not found")
    return {"id": user.id, "username": user.username, "created_at": user.created_at}


@get("/api/users/{username:str}")
async def get_user(username: str, db_session: AsyncSession) -> dict[str, Any]:
    return public(await db_session.scalar(select(User).where(User.username == username)))


@get("/api/users/me")
async def me(request: Request[Any, Any, Any], db_session: AsyncSession) -> dict[str, Any]:
    token = request.headers["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, os.environ["SECRET_KEY"], algorithms=["HS256"], audience="users")
    return public(await db_session.get(User, int(claims["sub"])))


@get("/api/users")
async def list_users(db_session: AsyncSession, limit: int = 20, after: str = "") -> dict[str, Any]:
    query = select(User).where(User.username > after).order_by(User.username).limit(limit)
    items = [public(user) for user in await db_session.scalars(query)]
    return {"items": items, "next": items[-1]["username"] if items else None}


@post("/api/users/signup", status_code=201)
async def signup(data: dict[str, str], db_session: AsyncSession) -> dict[str, Any]:
    password_hash = await anyio.to_thread.run_sync(hasher.hash, data["password"], limiter=limiter)
    user = User(
        username=data["username"],
        username_key=data["username"].lower(),
        email=data["email"],
        email_key=email_key(data["email"]),
        password_hash=password_hash,
    )
    db_session.add(user)
    await db_session.flush()
    return public(user)


app = Litestar(route_handlers=[me, list_users, get_user, signup], plugins=[SQLAlchemyPlugin(config=alchemy)])
