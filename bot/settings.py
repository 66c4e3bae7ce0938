"""dishbot's configuration: environment variables ``DISHBOT_*`` and an optional ``dishbot.toml``.

Nested settings use ``__`` in the environment (``DISHBOT_TELEGRAM__TOKEN``) and tables in
TOML (``[telegram] token = "..."``). The environment wins over the file, the file over the
defaults. The file is ``$DISHBOT_CONFIG`` when set, otherwise ``./dishbot.toml`` if present.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bot.errors import ConfigError
from engine.images import DECODE_TIME_BUDGET_S

CONFIG_ENV_VAR = "DISHBOT_CONFIG"
DEFAULT_CONFIG_FILE = Path("dishbot.toml")
ADMIN_PLATFORMS = ("telegram", "discord")
WEBHOOK_SECRET_BYTES = 32  # token_urlsafe: 43 characters, all of them ones Telegram allows
_WEBHOOK_SECRET_LABEL = b"dishbot telegram webhook secret"
_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")  # what Telegram's setWebhook accepts


class _Section(BaseModel):
    # A typo in dishbot.toml should be an error, not a silently ignored key.
    model_config = ConfigDict(extra="forbid")


class OpenAISettings(_Section):
    """A remote OpenAI-compatible server: `lmdeploy serve api_server`, its proxy, or vLLM."""

    base_url: str = "http://127.0.0.1:23333/v1"
    api_key: SecretStr | None = None
    model: str | None = Field(
        default=None, description="model name to request; the server's first model when unset"
    )
    stall_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a question fails when the server sends nothing for this long (it hangs)",
    )


class EngineSettings(_Section):
    """The shared InternVL engine: backend, model, batching, queue and generation limits."""

    backend: Literal["auto", "lmdeploy", "transformers", "openai"] = Field(
        default="auto",
        description="auto: lmdeploy when it is installed and a GPU is visible, else transformers",
    )
    model: str | None = Field(
        default=None,
        description="a hub id or a directory; default per backend: lmdeploy "
        "OpenGVLab/InternVL2-2B, transformers OpenGVLab/InternVL3-1B-hf, openai the server's",
    )
    device: str = Field(default="auto", description="torch device for the transformers backend")
    max_batch_size: int = Field(default=16, ge=1, description="requests generated together")
    max_queue: int = Field(default=256, ge=1, description="questions waiting, all users together")
    max_tiles: int = Field(default=6, ge=1, le=40, description="448x448 tiles per image")
    max_new_tokens: int = Field(default=512, ge=1, le=8192)
    request_timeout_s: float = Field(default=120.0, gt=0, description="queue wait + generation")
    load_timeout_s: float = Field(default=600.0, gt=0, description="loading or swapping a model")
    decode_time_budget_s: float = Field(
        default=DECODE_TIME_BUDGET_S, gt=0, description="longest one photo may take to decode"
    )
    circuit_failures: int = Field(
        default=5, ge=1, description="backend failures in a row that stop new questions"
    )
    circuit_reset_s: float = Field(
        default=30.0, gt=0, description="how long questions are refused before a probe"
    )
    context_tokens: int = Field(
        default=8192,
        ge=1024,
        description="prompt plus answer the model reads at once (lmdeploy's session_len); "
        "longer conversations are trimmed, oldest turns first",
    )
    lmdeploy_engine: Literal["turbomind", "pytorch"] = Field(
        default="turbomind", description="lmdeploy's inference engine"
    )
    tp: int = Field(default=1, ge=1, description="GPUs one model is split over (lmdeploy)")
    openai: OpenAISettings = OpenAISettings()


class TelegramSettings(_Section):
    """The Telegram bot. `base_url`/`base_file_url` point at a self-hosted Bot API server."""

    token: SecretStr | None = None
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = Field(default=None, description="public HTTPS URL Telegram posts to")
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = Field(default=8443, ge=1, le=65535)
    webhook_path: str = "/telegram"
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="header Telegram sends with every update; default in webhook mode: one "
        "derived from the bot token, the same in every process and across restarts",
    )

    @model_validator(mode="after")
    def _webhook_needs_url(self) -> TelegramSettings:
        if self.mode == "webhook" and not self.webhook_url:
            raise ValueError("telegram.mode = webhook needs telegram.webhook_url")
        return self

    @model_validator(mode="after")
    def _webhook_is_never_open(self) -> TelegramSettings:
        # Without a secret anyone who finds the URL can post updates "from" any user. One
        # made here is in `Settings.secret_values`, so the log scrubber knows it too.
        if self.webhook_secret is None and self.mode == "webhook":
            self.webhook_secret = SecretStr(_webhook_secret_for(self.token))
        secret = self.webhook_secret
        if secret is not None and not _WEBHOOK_SECRET.fullmatch(secret.get_secret_value()):
            raise ValueError("telegram.webhook_secret must be 1-256 of A-Z a-z 0-9 _ -")
        return self


def _webhook_secret_for(token: SecretStr | None) -> str:
    """A webhook secret only the token's holder can know: an HMAC of the bot token, so every
    process serving the bot (behind one load balancer) registers and expects the same one, and
    it changes when the token does. Without a token (the bot will not start), a random one."""
    if token is None:
        return secrets.token_urlsafe(WEBHOOK_SECRET_BYTES)
    key = token.get_secret_value().encode()
    digest = hmac.new(key, _WEBHOOK_SECRET_LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class DiscordSettings(_Section):
    """The Discord bot. `api_base`/`gateway_url` override the endpoints (self-hosted or tests)."""

    token: SecretStr | None = None
    api_base: str | None = None
    gateway_url: str | None = None
    guild_ids: list[int] = Field(
        default_factory=list,
        description="servers whose slash commands are registered at start, there at once; "
        "empty: globally",
    )


class LimitSettings(_Section):
    """What one user may ask for."""

    questions_per_minute: int = Field(default=6, ge=1, description="per-user rate limit")
    max_pending_per_user: int = Field(default=3, ge=1, description="unanswered questions per user")


class TrainingSettings(_Section):
    """Exporting feedback as training data, retraining, evaluating and promoting.

    XTuner runs as a subprocess in its own Python environment; dishbot's own trainer
    (transformers + peft) runs as a subprocess of this one's.
    """

    trainer: Literal["auto", "xtuner", "transformers"] = Field(
        default="auto",
        description="auto: xtuner for the lmdeploy backend, transformers for the transformers "
        "backend",
    )
    python: str = Field(default="python3", description="interpreter of the XTuner environment")
    gpus: int = Field(default=1, ge=1, description="GPUs XTuner trains on (torchrun when > 1)")
    threads: int = Field(
        default=1, ge=1, description="CPU threads dishbot's trainer may use, so the bot keeps up"
    )
    promote_margin: float = Field(
        default=0.1, ge=0, le=1, description="how much better (0..1) a candidate must score"
    )
    min_eval_samples: int = Field(
        default=5, ge=1, description="held-out questions needed to decide on held-out alone"
    )
    kept_samples: int = Field(
        default=20, ge=0, description="approved answers of the active model re-asked to check"
    )
    kept_tolerance: float = Field(
        default=0.1, ge=0, le=1, description="how much agreement on kept answers may drop"
    )
    follow_interval_s: float = Field(
        default=2.0, gt=0, description="how often each process checks which version is active"
    )
    work_dir: Path | None = Field(default=None, description="default: <data_dir>/training")
    base_model: str = Field(
        default="OpenGVLab/InternVL2-2B",
        description="the InternVL2 (InternLM2-based) checkpoint XTuner fine-tunes: path or hub id",
    )
    deepspeed: str = Field(default="deepspeed_zero2", description="XTuner deepspeed preset")
    epochs: int = Field(default=10, ge=1, description="passes over the data; small data needs many")
    learning_rate: float = Field(default=3e-5, gt=0, description="peak learning rate")
    batch_size: int = Field(
        default=2, ge=1, description="per device; the recipe's 8 did not fit in GPU memory"
    )
    accumulative_counts: int = Field(default=2, ge=1, description="gradient accumulation steps")
    save_steps: int = Field(default=64, ge=1, description="iterations between checkpoints")
    max_length: int = Field(
        default=8192, ge=256, description="tokens per sample, image tokens included"
    )
    agreeing_corrections: int = Field(
        default=2,
        ge=1,
        description="distinct users who must give the same correction before it is trained on",
    )
    max_samples_per_user: int = Field(
        default=200, ge=1, description="training samples one user's questions or corrections yield"
    )
    lora_r: int = Field(default=128, ge=1)
    lora_alpha: int = Field(default=256, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)


class WebSettings(_Section):
    """The web console: the chat page, /metrics, /healthz and /readyz on one local port."""

    enabled: bool = Field(default=True, description="serve the web console with `dishbot run`")
    listen: str = Field(
        default="127.0.0.1", description="address to bind; put a TLS proxy in front to share it"
    )
    port: int = Field(default=8080, ge=0, le=65535, description="0: any free port")
    admin_password: SecretStr | None = Field(
        default=None, description="password of the admin pages"
    )


def _parse_admins(value: Any) -> Any:
    """Accept a JSON list (``["telegram:1","discord:2"]``) or a comma-separated string."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"admins is not a valid JSON list: {exc.msg}") from None
    return [part.strip() for part in text.split(",") if part.strip()]


class Settings(BaseSettings):
    """Everything dishbot reads from its environment and ``dishbot.toml``."""

    model_config = SettingsConfigDict(
        env_prefix="DISHBOT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Path("./data")
    database_url: str | None = Field(
        default=None, description="default: SQLite file <data_dir>/dishbot.db"
    )
    admins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description='e.g. ["telegram:123","discord:456"]'
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    engine: EngineSettings = EngineSettings()
    telegram: TelegramSettings = TelegramSettings()
    discord: DiscordSettings = DiscordSettings()
    limits: LimitSettings = LimitSettings()
    training: TrainingSettings = TrainingSettings()
    web: WebSettings = WebSettings()

    @field_validator("admins", mode="before")
    @classmethod
    def _admins_from_text(cls, value: Any) -> Any:
        return _parse_admins(value)

    @field_validator("admins")
    @classmethod
    def _admins_are_platform_ids(cls, value: list[str]) -> list[str]:
        for admin in value:
            platform, _, user_id = admin.partition(":")
            if platform not in ADMIN_PLATFORMS or not user_id.isdigit():
                raise ValueError(
                    f"admin {admin!r} is not of the form telegram:<user id> or discord:<user id>"
                )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fill_derived_defaults(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite+aiosqlite:///{(self.data_dir / 'dishbot.db').resolve()}"
        if self.training.work_dir is None:
            self.training.work_dir = self.data_dir / "training"
        return self

    @property
    def db_url(self) -> str:
        """The database URL (always set after validation)."""
        assert self.database_url is not None
        return self.database_url

    @property
    def training_dir(self) -> Path:
        """Where exports and training runs go (always set after validation)."""
        assert self.training.work_dir is not None
        return self.training.work_dir

    def is_admin(self, platform: str, user_id: str | int) -> bool:
        """Whether ``platform:user_id`` was named in ``admins``."""
        return f"{platform}:{user_id}" in self.admins

    def secret_values(self) -> list[str]:
        """Every secret set in these settings, for scrubbing them from log output."""
        secrets = [
            self.telegram.token,
            self.telegram.webhook_secret,
            self.discord.token,
            self.engine.openai.api_key,
            self.web.admin_password,
        ]
        values = [s.get_secret_value() for s in secrets if s is not None]
        password = _database_password(self.db_url)
        if password:
            values.append(password)
        for where, value in _text_settings(self.model_dump(mode="json")):
            values += _url_secrets(value, user_is_a_name=where == "database_url")
        return [v for v in values if v]

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, with every secret replaced by asterisks."""
        # SecretStr dumps as '**********'; URLs carry their credentials in plain text.
        data: dict[str, Any] = _without_url_credentials(self.model_dump(mode="json"))
        # A database URL's user is the role to log in as, not a secret; its password may
        # also be in the query string, which only SQLAlchemy's parser knows about.
        data["database_url"] = redact_url(self.db_url)
        # A secret can sit elsewhere in a setting too: a token in the webhook URL's path, a
        # key in a query string. Nothing known to be secret is shown, wherever it is.
        hidden: dict[str, Any] = _with_secrets_hidden(data, self.secret_values())
        return hidden

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def _config_file() -> Path | None:
    named = os.environ.get(CONFIG_ENV_VAR)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV_VAR} names {path}, which is not a file")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _database_password(url: str) -> str | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    in_query = parsed.query.get("password")
    return parsed.password or (in_query if isinstance(in_query, str) else None)


def _text_settings(data: Any, where: str = "") -> list[tuple[str, str]]:
    """Every text value in dumped settings, with its dotted name (``engine.openai.base_url``)."""
    if isinstance(data, str):
        return [(where, data)]
    if isinstance(data, dict):
        items = [(f"{where}.{key}" if where else str(key), value) for key, value in data.items()]
    elif isinstance(data, list):
        items = [(where, value) for value in data]
    else:
        return []
    return [found for name, value in items for found in _text_settings(value, name)]


def _url_credentials(value: str) -> tuple[str, str | None] | None:
    """The user and password (None without one) that ``value`` carries, if it is such a URL."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if not parts.scheme or "@" not in parts.netloc:
        return None
    user, colon, password = parts.netloc.rpartition("@")[0].partition(":")
    return user, password if colon else None


def _url_secrets(value: str, *, user_is_a_name: bool) -> list[str]:
    """The credentials in URL ``value`` as they may be written in a log line: as set, decoded.

    Without a password, what stands before the host is taken for a token
    (``https://TOKEN@host``), unless ``user_is_a_name``.
    """
    in_query = _query_secrets(value)
    credentials = _url_credentials(value)
    if credentials is None:
        return in_query
    user, password = credentials
    if password is None:
        return in_query + ([] if user_is_a_name else [user, unquote(user)])
    return [*in_query, f"{user}:{password}", password, unquote(password)]


# Query parameters that carry a credential in an HTTP URL (`?api-key=...`, `?token=...`).
_SECRET_PARAMETER = re.compile(r"(?:api[-_]?)?(?:key|token|secret|password|passwd|pwd|sig)", re.I)


def _query_secrets(value: str) -> list[str]:
    """The values of ``value``'s query parameters named like credentials, as set and decoded."""
    try:
        query = urlsplit(value).query
    except ValueError:
        return []
    found: list[str] = []
    for pair in query.split("&"):
        name, _, secret = pair.partition("=")
        if secret and _SECRET_PARAMETER.fullmatch(unquote(name).strip()):
            found += [secret, unquote(secret)]
    return found


def _without_url_credentials(data: Any) -> Any:
    """Dumped settings with the credentials in every URL in them hidden."""
    if isinstance(data, dict):
        return {key: _without_url_credentials(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_without_url_credentials(value) for value in data]
    if not isinstance(data, str) or (credentials := _url_credentials(data)) is None:
        return data
    user, password = credentials
    written = user if password is None else f"{user}:{password}"
    shown = "***" if password is None else f"{user}:***"
    # Only the scheme and "//" come before the user-info, and they hold no "@".
    return data.replace(f"{written}@", f"{shown}@", 1)


def _with_secrets_hidden(data: Any, secrets: list[str]) -> Any:
    """Dumped settings with every occurrence of ``secrets`` in their text replaced by ***."""
    if isinstance(data, dict):
        return {key: _with_secrets_hidden(value, secrets) for key, value in data.items()}
    if isinstance(data, list):
        return [_with_secrets_hidden(value, secrets) for value in data]
    if not isinstance(data, str):
        return data
    for secret in sorted(set(secrets), key=len, reverse=True):  # a longer one holds a shorter
        data = data.replace(secret, "***")
    return data


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by asterisks."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return "<unparseable URL>"
    hidden = {key: _QUERY_MASK for key in parsed.query if key in _SECRET_QUERY_KEYS}
    if hidden:
        parsed = parsed.update_query_dict(hidden)
    return parsed.render_as_string(hide_password=True).replace(_QUERY_MASK, "***")


# Connection parameters that carry a secret when given in a database URL's query string.
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword", "passfile"})
_QUERY_MASK = "REDACTEDxSECRET"  # survives URL quoting, then shown as ***


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning any problem into one `ConfigError` a person can act on."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file is not valid TOML: {exc}") from None


def _describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        problems.append(f"{where}: {message}")
    return "invalid settings: " + "; ".join(problems)
