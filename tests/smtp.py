"""A real SMTP server on loopback for the mail tests: aiosmtpd, in a thread of the test's own, that
keeps what it received, and can be stopped and started again on its port, stall DATA, or refuse."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from email import message_from_bytes
from email.message import Message
from typing import Any, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from chaos import free_port

LINK = re.compile(r"https?://\S+[?&]token=([A-Za-z0-9_-]+)")


class SmtpServer:
    """Messages received (parsed), by arrival. `refuse` maps a recipient to the reply its DATA gets
    (say "550 no such mailbox", or "451 try later"); `stall` holds DATA until it is set."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"smtp://127.0.0.1:{self.port}"
        self.received: list[Message] = []
        self.refuse: dict[str, str] = {}
        self.stall = threading.Event()
        self.stall.set()
        self.stalled = threading.Event()  # set while a DATA is held
        self.changed = threading.Condition()
        self.controller: Controller | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        for recipient in envelope.rcpt_tos:
            if recipient in self.refuse:
                return self.refuse[recipient]
        if not self.stall.is_set():
            self.stalled.set()
            await asyncio.to_thread(self.stall.wait)  # the server's own loop stays free
        with self.changed:
            content = envelope.content or b""
            self.received.append(message_from_bytes(content if isinstance(content, bytes) else content.encode()))
            self.changed.notify_all()
        return "250 OK"

    def start(self) -> Self:
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.stall.set()
            self.controller.stop()
            self.controller = None

    def wait_for(self, count: int, seconds: float = 30) -> list[Message]:
        """Block (call it in a thread) until `count` messages have come; then all of them."""
        deadline = time.monotonic() + seconds
        with self.changed:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.received)} of {count} messages came within {seconds} s")
                self.changed.wait(left)
            return list(self.received)

    def to(self, address: str) -> list[Message]:
        return [message for message in self.received if message["To"] == address]


def body_of(message: Message) -> str:
    payload: Any = message.get_payload(decode=True)
    return str(payload.decode())


def token_of(message: Message) -> str:
    """The token of the link in a message."""
    found = LINK.search(body_of(message))
    assert found, body_of(message)
    return found.group(1)
