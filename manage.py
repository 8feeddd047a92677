"""The operator's command line, run with the service's settings (DATABASE_URL and the rest):

    python manage.py COMMAND USERNAME      (scripts/manage in a checkout; in the image as it is)

Each command prints what it did and records it in the security trail (actor "command line"); an
unknown user is an error (exit 1). The same actions as the admin API (operations.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import operations
from audit import COMMAND_LINE
from db import Database, transaction
from engine import make_engine
from settings import Settings
from stores import UserStore

COMMANDS = {
    "grant-admin": operations.grant_admin,
    "revoke-admin": operations.revoke_admin,
    "disable": operations.disable,
    "enable": operations.enable,
    "end-sessions": operations.end_sessions,
    "clear-throttle": operations.clear_throttle,
}


async def run(command: str, username: str, settings: Settings) -> int:
    engine = make_engine(settings, pooled=False)
    try:
        async with transaction(Database.on(engine).writes) as session:
            user = await UserStore(session).get_by_username(username)
            if user is None:
                print(f"{command}: there is no user named {username!r}", file=sys.stderr)
                return 1
            said = await COMMANDS[command](session, user, COMMAND_LINE)
    finally:
        await engine.dispose()
    print(said)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="manage.py", description="Act on an account, as an operator.")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("username")
    arguments = parser.parse_args(argv)
    return asyncio.run(run(arguments.command, arguments.username, Settings.from_environ()))


if __name__ == "__main__":
    sys.exit(main())
