"""Everything the service reads from the environment, with its defaults (the README's table)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.config import Config


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from the environment, with its defaults."""

    database_url: str = "sqlite+aiosqlite:///./users.db"
    # Measured by scripts/bench (README, Performance): overflow connections are opened and
    # closed again under steady load, and pre-ping costs three round trips per checkout on
    # asyncpg (BEGIN, ping, ROLLBACK); a dead connection is caught by the 503 mapping instead.
    pool_size: int = 10
    max_overflow: int = 0
    pool_timeout: float = 5.0
    pool_recycle: int = 28000
    pool_pre_ping: bool = False
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    max_body_bytes: int = 65536
    body_timeout: float = 10.0
    secret_key: str | None = None
    secret_key_fallbacks: tuple[str, ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    access_token_ttl: int = 15 * 60
    refresh_token_ttl: int = 7 * 24 * 3600
    token_leeway: float = 30.0
    signin_failure_limit: int = 5
    signin_address_failure_limit: int = 50
    signin_failure_window: int = 900
    web_concurrency: int = 1
    application_name: str = "users"
    pgbouncer: bool = False
    log_format: str = "text"
    request_log: bool = True
    metrics: bool = True
    metrics_dir: str | None = None

    @classmethod
    def from_environ(cls) -> Settings:
        config = Config()  # environment only: no .env file is read
        return cls(
            database_url=config("DATABASE_URL", default=cls.database_url),
            pool_size=config("DB_POOL_SIZE", cast=int, default=cls.pool_size),
            max_overflow=config("DB_MAX_OVERFLOW", cast=int, default=cls.max_overflow),
            pool_timeout=config("DB_POOL_TIMEOUT", cast=float, default=cls.pool_timeout),
            pool_recycle=config("DB_POOL_RECYCLE", cast=int, default=cls.pool_recycle),
            pool_pre_ping=config("DB_POOL_PRE_PING", cast=bool, default=cls.pool_pre_ping),
            connect_timeout=config("DB_CONNECT_TIMEOUT", cast=float, default=cls.connect_timeout),
            command_timeout=config("DB_COMMAND_TIMEOUT", cast=float, default=cls.command_timeout),
            max_body_bytes=config("MAX_BODY_BYTES", cast=int, default=cls.max_body_bytes),
            body_timeout=config("BODY_TIMEOUT", cast=float, default=cls.body_timeout),
            secret_key=config("SECRET_KEY", default=None) or None,
            secret_key_fallbacks=config("SECRET_KEY_FALLBACKS", cast=comma_separated, default=""),
            cors_allow_origins=config("CORS_ALLOW_ORIGINS", cast=comma_separated, default=""),
            access_token_ttl=config("ACCESS_TOKEN_TTL", cast=int, default=cls.access_token_ttl),
            refresh_token_ttl=config("REFRESH_TOKEN_TTL", cast=int, default=cls.refresh_token_ttl),
            token_leeway=config("TOKEN_LEEWAY", cast=float, default=cls.token_leeway),
            signin_failure_limit=config("SIGNIN_FAILURE_LIMIT", cast=int, default=cls.signin_failure_limit),
            signin_address_failure_limit=config(
                "SIGNIN_ADDRESS_FAILURE_LIMIT", cast=int, default=cls.signin_address_failure_limit
            ),
            signin_failure_window=config("SIGNIN_FAILURE_WINDOW", cast=int, default=cls.signin_failure_window),
            web_concurrency=config("WEB_CONCURRENCY", cast=int, default=cls.web_concurrency),
            application_name=config("DB_APPLICATION_NAME", default=cls.application_name),
            pgbouncer=config("DB_PGBOUNCER", cast=bool, default=cls.pgbouncer),
            log_format=config("LOG_FORMAT", cast=log_format, default=cls.log_format),
            request_log=config("REQUEST_LOG", cast=bool, default=cls.request_log),
            metrics=config("METRICS", cast=bool, default=cls.metrics),
            metrics_dir=config("METRICS_DIR", default=None) or None,
        )


def log_format(value: str) -> str:
    if value not in ("json", "text"):
        raise ValueError(f"LOG_FORMAT must be json or text, not {value!r}")
    return value


def comma_separated(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())
