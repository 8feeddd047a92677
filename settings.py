"""Every setting, declared once: its environment variable, default, parser and meaning (environ.py
says how). `Settings.from_environ()` reads them, and the README's configuration table is
`python settings.py`'s output (a test compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass

from environ import boolean, comma_separated, from_environ, optional, readme_table, setting


def password_min_length(value: str) -> int:
    length = int(value)
    if not 8 <= length <= 64:
        raise ValueError(f"must be 8 (ASVS 5.0's floor) to 64, not {length}")
    return length


def token_algorithm(value: str) -> str:
    if value not in ("ES256", "EdDSA", "RS256"):
        raise ValueError(f"TOKEN_ALGORITHM must be ES256, EdDSA or RS256, not {value!r}")
    return value


def log_format(value: str) -> str:
    if value not in ("json", "text"):
        raise ValueError(f"LOG_FORMAT must be json or text, not {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """What the service reads from the environment. Tests build one directly."""

    # fmt: off
    database_url: str = setting(
        "DATABASE_URL", "sqlite+aiosqlite:///./users.db", str,
        "a SQLite file in the working directory. `postgresql://`, `postgres://` and `sqlite://` URLs get the asyncio "
        "driver (`+asyncpg`, `+aiosqlite`) automatically. Several hosts, in libpq's form "
        "(`postgresql://app@h1:5432,h2:5432/users?target_session_attrs=read-write`) or SQLAlchemy's "
        "(`?host=h1:5432&host=h2:5432`): the first that takes writes "
        "([docs/high-availability.md](docs/high-availability.md))",
        secret=True,
    )
    pool_size: int = setting("DB_POOL_SIZE", 10, int, "connections the pool keeps open, per process")
    max_overflow: int = setting(
        "DB_MAX_OVERFLOW", 0, int, "extra connections opened under load beyond the pool size, and closed when returned"
    )
    pool_timeout: float = setting(
        "DB_POOL_TIMEOUT", 5.0, float, "seconds a request waits for a free connection before it answers 503"
    )
    pool_recycle: int = setting(
        "DB_POOL_RECYCLE", 28000, int, "seconds after which a connection is replaced at its next checkout"
    )
    pool_pre_ping: bool = setting(
        "DB_POOL_PRE_PING", False, boolean,
        "test each connection when it is checked out (on asyncpg: BEGIN, a ping, ROLLBACK)",
    )
    connect_timeout: float = setting(
        "DB_CONNECT_TIMEOUT", 5.0, float, "seconds to open a PostgreSQL connection (asyncpg's own default is 60)"
    )
    command_timeout: float = setting(
        "DB_COMMAND_TIMEOUT", 10.0, float,
        "seconds any one PostgreSQL statement may take (asyncpg has no default); also the bound on closing a session",
    )
    pgbouncer: bool = setting(
        "DB_PGBOUNCER", False, boolean,
        "`true` behind PgBouncer in transaction mode. Safe there because nothing outlives a transaction on a server "
        "connection: statements are unnamed and uncached, reads run in transactions too, nothing is set per session "
        "([docs/scaling.md](docs/scaling.md))",
    )
    application_name: str = setting(
        "DB_APPLICATION_NAME", "users", str,
        "the `application_name` of the service's PostgreSQL connections (as `pg_stat_activity` shows them)",
    )
    max_body_bytes: int = setting(
        "MAX_BODY_BYTES", 65536, int,
        "largest request body accepted; larger ones get 413 before they are read (request heads: 16 KiB, then 431)",
    )
    body_timeout: float = setting(
        "BODY_TIMEOUT", 10.0, float,
        "seconds a client has to send the whole request body, which is read before any route runs; then 408",
    )
    head_timeout: float = setting(
        "HEAD_TIMEOUT", 10.0, float,
        "seconds a connection has to send a whole request head, from its opening or the end of the previous answer; "
        "then it is closed",
    )
    signing_key_file: str | None = setting(
        "SIGNING_KEY_FILE", None, optional,
        "a PEM file with the private key that signs tokens (P-256 for ES256, Ed25519 for EdDSA, RSA for RS256); "
        "its public half is published at `/.well-known/jwks.json`. `scripts/serve` makes a development key when "
        "neither this nor `SECRET_KEY` is set ([docs/tokens.md](docs/tokens.md))",
    )
    signing_key_fallback_files: tuple[str, ...] = setting(
        "SIGNING_KEY_FALLBACK_FILES", (), comma_separated,
        "comma-separated PEM files (private or public keys) still accepted for checking tokens and published, never "
        "used to sign: the next key before it signs, the last one until its tokens expire",
    )
    token_algorithm: str = setting(
        "TOKEN_ALGORITHM", "ES256", token_algorithm, "`ES256`, `EdDSA` or `RS256`: what `SIGNING_KEY_FILE` is for"
    )
    token_issuer: str = setting(
        "TOKEN_ISSUER", "http://127.0.0.1:8000", str,
        "the `iss` of every token, checked on every token: the service's public URL",
    )
    token_audience: str = setting("TOKEN_AUDIENCE", "users", str, "the `aud` of every token, checked on every token")
    secret_key: str | None = setting(
        "SECRET_KEY", None, optional,
        "the HS256 key, at least 32 bytes of 10 or more distinct characters: with no `SIGNING_KEY_FILE`, it signs "
        "tokens (the single-service mode: whoever holds it can mint tokens); beside one, its tokens are still "
        "accepted until they expire. Unset as well, a single process makes a random one and logs a warning; "
        "`server.py` (scripts/serve, the image) refuses to start",
        secret=True,
    )
    secret_key_fallbacks: tuple[str, ...] = setting(
        "SECRET_KEY_FALLBACKS", (), comma_separated,
        "comma-separated earlier HS256 keys, still accepted for checking tokens, never for signing (see Rotating "
        "`SECRET_KEY`)",
        secret=True,
    )
    service_name: str = setting(
        "SERVICE_NAME", "users", str, "the service's name, as people see it: no password may contain it"
    )
    access_token_ttl: int = setting("ACCESS_TOKEN_TTL", 900, int, "seconds an access token is valid (15 minutes)")
    refresh_token_ttl: int = setting("REFRESH_TOKEN_TTL", 604800, int, "seconds a refresh token is valid (7 days)")
    session_max_age: int = setting(
        "SESSION_MAX_AGE", 2592000, int,
        "seconds after its signin that a session (a token family) stops refreshing, however often it was refreshed "
        "(30 days)",
    )
    refresh_reuse_grace: float = setting(
        "REFRESH_REUSE_GRACE", 10.0, float,
        "seconds after a refresh during which the refresh token it spent still answers, with tokens of the session's "
        "newest generation (a lost answer, two tabs); later, a reuse ends the session",
    )
    token_leeway: float = setting(
        "TOKEN_LEEWAY", 30.0, float,
        "seconds of clock difference between replicas allowed when a token's `iat`, `nbf` and `exp` are checked",
    )
    device_token_ttl: int = setting(
        "DEVICE_TOKEN_TTL", 7776000, int,
        "seconds a signin's `device_token` lets that device past the address and account throttles (90 days)",
    )
    argon2_memory_kib: int = setting(
        "ARGON2_MEMORY_KIB", 19456, int,
        "memory of one Argon2id password hash, in KiB (OWASP's baseline: 19 MiB, with 2 passes); a hash made "
        "with other parameters is made again at its next signin",
    )
    argon2_time_cost: int = setting("ARGON2_TIME_COST", 2, int, "passes of one Argon2id password hash")
    password_min_length: int = setting(
        "PASSWORD_MIN_LENGTH", 15, password_min_length,
        "fewest characters of a new password (NIST SP 800-63B rev 4, for a password that is the only factor); "
        "at least 8 ([docs/accounts.md](docs/accounts.md) says what a lower one trades)",
    )
    pwned_passwords_url: str | None = setting(
        "PWNED_PASSWORDS_URL", None, optional,
        "a Pwned Passwords range API (`https://api.pwnedpasswords.com`): a new password found there is refused. "
        "Only the first 5 hex digits of its SHA-1 leave the process; 2 s timeout",
    )
    pwned_passwords_fail_closed: bool = setting(
        "PWNED_PASSWORDS_FAIL_CLOSED", False, boolean,
        "`true`: when the range API does not answer, refuse new passwords with 503 instead of accepting them",
    )
    signin_failure_limit: int = setting(
        "SIGNIN_FAILURE_LIMIT", 5, int,
        "failed password checks for one username from one address, within the window, before that pair gets 429; "
        "`0` turns the rule off",
    )
    signin_address_failure_limit: int = setting(
        "SIGNIN_ADDRESS_FAILURE_LIMIT", 50, int,
        "failed password checks from one address over any usernames, within the window, before that address gets "
        "429 for every signin; `0` turns it off",
    )
    signin_account_failure_limit: int = setting(
        "SIGNIN_ACCOUNT_FAILURE_LIMIT", 100, int,
        "failed password checks for one account from any addresses, within the window, before its signins get 429 "
        "(but from a known device); `0` turns it off",
    )
    signin_failure_window: int = setting(
        "SIGNIN_FAILURE_WINDOW", 900, int, "seconds a window of failures lasts, from its first failure"
    )
    signup_address_limit: int = setting(
        "SIGNUP_ADDRESS_LIMIT", 50, int,
        "signups from one address within `SIGNUP_WINDOW` before that address gets 429; `0` turns it off",
    )
    signup_window: int = setting("SIGNUP_WINDOW", 3600, int, "seconds a window of signups lasts, from its first")
    mail_url: str = setting(
        "MAIL_URL", "log:", str,
        "where mail goes: `smtp://[user:pass@]host:port` (plain), `smtp+starttls://...`, `smtps://...` (TLS from the "
        "start); `log:` writes each message to the log instead, tokens included, for development "
        "([docs/mail.md](docs/mail.md))",
        secret=True,
    )
    mail_from: str = setting("MAIL_FROM", "users@localhost", str, "the `From` of every mail")
    app_url: str = setting(
        "APP_URL", "http://127.0.0.1:8000", str,
        "the application in front of the API: mails link to `{APP_URL}/reset-password?token=...` and "
        "`{APP_URL}/verify-email?token=...`",
    )
    mail_delivery: bool = setting(
        "MAIL_DELIVERY", True, boolean,
        "`false`: this process queues mail but leaves its delivery to others (replicas, or a process of its own)",
    )
    mail_poll_interval: float = setting(
        "MAIL_POLL_INTERVAL", 1.0, float,
        "seconds between looks at the outbox (a process's own commits wake its delivery loop at once)",
    )
    mail_claim_lease: float = setting(
        "MAIL_CLAIM_LEASE", 60.0, float,
        "seconds a claimed message is another process's: longer than one SMTP conversation, after which a message "
        "whose process died is sent again",
    )
    mail_retry_max_delay: float = setting(
        "MAIL_RETRY_MAX_DELAY", 300.0, float, "longest wait before another try to send (from 1 s, doubling, jittered)"
    )
    mail_max_attempts: int = setting(
        "MAIL_MAX_ATTEMPTS", 10, int, "tries to send a message before it is marked failed (a 5xx refusal: one)"
    )
    mail_retention: int = setting(
        "MAIL_RETENTION", 604800, int, "seconds a sent message's record is kept (7 days; its body goes once sent)"
    )
    password_reset_ttl: int = setting("PASSWORD_RESET_TTL", 3600, int, "seconds a password reset token is valid, once")
    password_reset_limit: int = setting(
        "PASSWORD_RESET_LIMIT", 3, int,
        "reset and verification mails asked for one email address an hour, whether it has an account or not; "
        "then 429",
    )
    password_reset_address_limit: int = setting(
        "PASSWORD_RESET_ADDRESS_LIMIT", 20, int,
        "reset and verification mails asked for from one client address an hour; then 429",
    )
    email_verification_ttl: int = setting(
        "EMAIL_VERIFICATION_TTL", 86400, int, "seconds an email verification token is valid, once (24 hours)"
    )
    require_verified_email: bool = setting(
        "REQUIRE_VERIFIED_EMAIL", False, boolean,
        "`true`: signin answers 403 for an account whose email is not verified (after the right password)",
    )
    audit_retention_days: int = setting(
        "AUDIT_RETENTION_DAYS", 90, int, "days the security trail keeps an event (purged on the way)"
    )
    cors_allow_origins: tuple[str, ...] = setting(
        "CORS_ALLOW_ORIGINS", (), comma_separated,
        "comma-separated origins that browsers may call the API from (`https://app.example.com`); empty: no CORS "
        "headers at all. `*` allows any origin",
    )
    log_format: str = setting(
        "LOG_FORMAT", "text", log_format,
        "`json`: one JSON object per line on stdout (the image's default); `text`: one readable line",
    )
    request_log: bool = setting(
        "REQUEST_LOG", True, boolean, "one log line per request (in place of uvicorn's access log)"
    )
    metrics: bool = setting("METRICS", True, boolean, "Prometheus metrics at `/metrics`")
    metrics_token: str | None = setting(
        "METRICS_TOKEN", None, optional,
        "when set, `/metrics` answers only a request with `Authorization: Bearer <it>` (Prometheus' "
        "`authorization` scrape setting); set it wherever anyone else can reach the port",
        secret=True,
    )
    metrics_dir: str | None = setting(
        "METRICS_DIR", None, optional,
        "with `WEB_CONCURRENCY` above 1: the directory the workers' metrics files go to, emptied when the service "
        "starts (one service a directory)",
        shown="`users-metrics-<PORT>` in the temporary directory",
    )
    graceful_timeout: int = setting(
        "GRACEFUL_TIMEOUT", 20, int, "seconds SIGTERM waits for the requests in flight before uvicorn stops"
    )
    host: str = setting("HOST", "127.0.0.1", str, "the address the server listens on (the image: `0.0.0.0`)")
    port: int = setting("PORT", 8000, int, "the port the server listens on")
    web_concurrency: int = setting(
        "WEB_CONCURRENCY", 1, int, "uvicorn worker processes (read by uvicorn itself); each builds its own engine"
    )
    forwarded_allow_ips: str | None = setting(
        "FORWARDED_ALLOW_IPS", None, optional,
        "comma-separated addresses of the proxies whose `X-Forwarded-For` and `X-Forwarded-Proto` are trusted (your "
        "load balancer's); unset, no proxy header is trusted and the client is the connection's peer",
    )
    # fmt: on

    @classmethod
    def from_environ(cls) -> Settings:
        return cls(**from_environ(cls))


if __name__ == "__main__":
    print(readme_table(Settings))
