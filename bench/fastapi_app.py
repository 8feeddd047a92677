"""The common alternative: FastAPI with the textbook session dependency (commit after `yield`)
and a UserStore on top, the shape of the study note's code, with the engine made once.

Bench only. FastAPI 0.165.0 (requirements-bench.txt): a dependency with `yield` and the default
scope runs the code after `yield` once the response has been sent, so the commit comes after the
client has its answer.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import anyio.to_thread
import jwt
from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from engine import async_url
from models import User, email_key
from passwords import argon2id

hasher = argon2id()  # the service's parameters: the same hash costs the same everywhere

engine = create_async_engine(async_url(os.environ["DATABASE_URL"]), pool_recycle=28000, pool_pre_ping=True)
session_factory = async_sessionmaker(bind=engine, expire_on_commit=False)
limiter = anyio.CapacityLimiter(os.cpu_count() or 1)


async def get_db_session() -> AsyncIterator[AsyncSession]:
    session = session_factory()
    try:
        yield session
        await session.commit()
    except Exception:
        await session.rollback()
        raise
    finally:
        await session.close()


class UserStore:
    def __init__(self, session: Annotated[AsyncSession, Depends(get_db_session)]) -> None:
        self.session = session

    async def get_user_by_username(self, username: str) -> User | None:
        return await self.session.scalar(select(User).where(User.username == username))


def public(user: User | None) -> dict[str, Any]:
    if user is None:
        raise HTTPException(404, "User not found")
    return {"id": user.id, "username": user.username, "created_at": user.created_at}


app = FastAPI()


@app.post("/api/users/signup", status_code=201)
async def signup(request: Request, store: Annotated[UserStore, Depends()]) -> dict[str, Any]:
    data = await request.json()
    password_hash = await anyio.to_thread.run_sync(hasher.hash, data["password"], limiter=limiter)
    user = User(
        username=data["username"],
        username_key=data["username"].lower(),
        email=data["email"],
        email_key=email_key(data["email"]),
        password_hash=password_hash,
    )
    store.session.add(user)
    await store.session.flush()
    return public(user)


@app.get("/api/users/me")
async def me(request: Request, store: Annotated[UserStore, Depends()]) -> dict[str, Any]:
    token = request.headers["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, os.environ["SECRET_KEY"], algorithms=["HS256"], audience="users")
    return public(await store.session.get(User, int(claims["sub"])))


@app.get("/api/users")
async def list_users(store: Annotated[UserStore, Depends()], limit: int = 20, after: str = "") -> dict[str, Any]:
    query = select(User).where(User.username > after).order_by(User.username).limit(limit)
    items = [public(user) for user in await store.session.scalars(query)]
    return {"items": items, "next": items[-1]["username"] if items else None}


@app.get("/api/users/{username}")
async def get_user(username: str, store: Annotated[UserStore, Depends()]) -> dict[str, Any]:
    return public(await store.get_user_by_username(username))
