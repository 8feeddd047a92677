"""The limit: the same lookups with a raw asyncpg pool; no ORM, no session, no validation library.

Bench only. Same routes, same JSON, same JWT check and Argon2id parameters as the service.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import argon2
import asyncpg
import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from passwords import argon2id

hasher = argon2id()  # the service's parameters: the same hash costs the same everywhere

PUBLIC = "SELECT id, username, created_at FROM users"
URL = os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")


def answer(row: Any, status: int = 200) -> Response:
    if row is None:
        return Response('{"detail":"User not found"}', 404, media_type="application/json")
    body = {**dict(row), "created_at": row["created_at"].isoformat()}
    return Response(json.dumps(body), status, media_type="application/json")


async def get_user(request: Request) -> Response:
    return answer(await request.state.pool.fetchrow(f"{PUBLIC} WHERE username = $1", request.path_params["name"]))


async def me(request: Request) -> Response:
    token = request.headers["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, os.environ["SECRET_KEY"], algorithms=["HS256"], audience="users")
    return answer(await request.state.pool.fetchrow(f"{PUBLIC} WHERE id = $1", int(claims["sub"])))


async def list_users(request: Request) -> Response:
    after, limit = request.query_params.get("after", ""), int(request.query_params.get("limit", 20))
    rows = await request.state.pool.fetch(f"{PUBLIC} WHERE username > $1 ORDER BY username LIMIT $2", after, limit)
    items = [{**dict(r), "created_at": r["created_at"].isoformat()} for r in rows]
    return Response(json.dumps({"items": items, "next": items[-1]["username"] if items else None}))


async def signup(request: Request) -> Response:
    data = await request.json()
    password_hash = await anyio.to_thread.run_sync(hasher.hash, data["password"], limiter=request.state.limiter)
    insert = (
        "INSERT INTO users (username, username_key, email, email_key, password_hash, created_at)"
        " VALUES ($1::varchar, lower($1::varchar), $2::varchar, lower($2::varchar), $3, now())"
    )
    row = await request.state.pool.fetchrow(f"{insert} RETURNING id, username, created_at", data["username"],
                                            data["email"], password_hash)  # fmt: skip
    return answer(row, 201)


async def signin(request: Request) -> Response:
    """One SELECT, the same Argon2id verify in a thread, and the three tokens the service signs."""
    data = await request.json()
    row = await request.state.pool.fetchrow("SELECT id, password_hash FROM users WHERE username = $1", data["username"])
    matches = row is not None and await anyio.to_thread.run_sync(
        verify, row["password_hash"], data["password"], limiter=request.state.limiter
    )
    if not matches:
        return Response('{"detail":"Incorrect username or password"}', 401, media_type="application/json")
    now, key = int(time.time()), os.environ["SECRET_KEY"]
    claims = {"iss": "users", "aud": "users", "sub": str(row["id"]), "iat": now, "exp": now + 900}
    body = {typ: jwt.encode({**claims, "typ": typ, "jti": uuid.uuid4().hex}, key) for typ in ("access", "refresh")}
    body["device_token"] = jwt.encode({**claims, "typ": "device", "jti": uuid.uuid4().hex}, key)
    return Response(json.dumps(body), media_type="application/json")


def verify(password_hash: str, password: str) -> bool:
    try:
        return hasher.verify(password_hash, password)
    except argon2.exceptions.VerificationError:
        return False


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    async with asyncpg.create_pool(URL, min_size=5, max_size=15) as pool:
        yield {"pool": pool, "limiter": anyio.CapacityLimiter(os.cpu_count() or 1)}


routes = [Route("/api/users/signup", signup, methods=["POST"]), Route("/api/users/me", me),
          Route("/api/users/signin", signin, methods=["POST"]),
          Route("/api/users", list_users), Route("/api/users/{name}", get_user)]  # fmt: skip
app = Starlette(routes=routes, lifespan=lifespan)
