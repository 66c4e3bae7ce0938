"""Settings from the environment and dishbot.toml; secrets never shown."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from pydantic import BaseModel

from bot.cli import main
from bot.engine_setup import engine_config
from bot.errors import ConfigError
from bot.logs import configure_logging
from bot.settings import Settings, load_settings

TOKEN = "123456789:AAHk-secret-telegram-token"


def _write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_settings_have_sensible_defaults() -> None:
    settings = load_settings()

    assert settings.data_dir == Path("data")
    assert settings.db_url == f"sqlite+aiosqlite:///{Path('data/dishbot.db').resolve()}"
    assert settings.engine.model is None  # each backend has its own default (model_source)
    assert settings.telegram.mode == "polling"
    assert settings.training.work_dir == Path("data/training")
    assert settings.admins == []


def test_settings_come_from_the_environment_with_double_underscore_nesting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISHBOT_DATA_DIR", "/srv/dishbot")
    monkeypatch.setenv("DISHBOT_ADMINS", '["telegram:123","discord:456"]')
    monkeypatch.setenv("DISHBOT_ENGINE__BACKEND", "openai")
    monkeypatch.setenv("DISHBOT_ENGINE__OPENAI__BASE_URL", "http://gpu-box:23333/v1")
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", TOKEN)
    monkeypatch.setenv("DISHBOT_LIMITS__MAX_PENDING_PER_USER", "5")

    settings = load_settings()

    assert settings.data_dir == Path("/srv/dishbot")
    assert settings.db_url == "sqlite+aiosqlite:////srv/dishbot/dishbot.db"
    assert settings.is_admin("telegram", 123)
    assert settings.is_admin("discord", "456")
    assert not settings.is_admin("telegram", 456)
    assert settings.engine.backend == "openai"
    assert settings.engine.openai.base_url == "http://gpu-box:23333/v1"
    assert settings.telegram.token is not None
    assert settings.telegram.token.get_secret_value() == TOKEN
    assert settings.limits.max_pending_per_user == 5


def test_admins_may_also_be_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISHBOT_ADMINS", "telegram:1, discord:2")

    assert load_settings().admins == ["telegram:1", "discord:2"]


def test_settings_come_from_dishbot_toml_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = _write_toml(
        tmp_path / "elsewhere.toml",
        """
        admins = ["telegram:7"]
        [engine]
        backend = "transformers"
        max_tiles = 4
        [telegram]
        token = "from-the-file"
        mode = "webhook"
        webhook_url = "https://bot.example.org/telegram"
        """,
    )
    monkeypatch.setenv("DISHBOT_CONFIG", str(config))
    monkeypatch.setenv("DISHBOT_ENGINE__MAX_TILES", "2")
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", TOKEN)

    settings = load_settings()

    assert settings.admins == ["telegram:7"]
    assert settings.engine.backend == "transformers"
    assert settings.engine.max_tiles == 2
    assert settings.telegram.token is not None
    assert settings.telegram.token.get_secret_value() == TOKEN
    assert settings.telegram.mode == "webhook"


def test_dishbot_toml_in_the_working_directory_is_read_without_being_named() -> None:
    _write_toml(Path("dishbot.toml"), '[discord]\napi_base = "http://127.0.0.1:9/api"\n')

    assert load_settings().discord.api_base == "http://127.0.0.1:9/api"


@pytest.mark.parametrize(
    ("toml", "complaint"),
    [
        ("[engine]\nmax_tile = 4\n", "engine.max_tile: unknown setting"),
        ("[engine]\nbackend = 'tensorrt'\n", "engine.backend"),
        ("[telegram]\nmode = 'webhook'\n", "webhook_url"),
        ("admins = ['alice']\n", "telegram:<user id>"),
        ("[engine\n", "not valid TOML"),
    ],
)
def test_a_bad_setting_is_named_in_one_clear_error(
    toml: str, complaint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DISHBOT_CONFIG", str(_write_toml(tmp_path / "bad.toml", toml)))

    with pytest.raises(ConfigError) as error:
        load_settings()

    assert complaint in str(error.value)
    assert "\n" not in str(error.value)


def test_a_config_file_that_does_not_exist_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISHBOT_CONFIG", "/nowhere/dishbot.toml")

    with pytest.raises(ConfigError, match=r"/nowhere/dishbot\.toml"):
        load_settings()


def test_dishbot_config_shows_the_settings_but_no_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", TOKEN)
    monkeypatch.setenv("DISHBOT_DISCORD__TOKEN", "discord-secret-token")
    monkeypatch.setenv("DISHBOT_ENGINE__OPENAI__API_KEY", "sk-openai-secret")
    monkeypatch.setenv("DISHBOT_DATABASE_URL", "postgresql://dishbot:pg-secret@db:5432/dishbot")
    monkeypatch.setenv("DISHBOT_ENGINE__MODEL", "/models/food-lora-3")

    assert main(["config"]) == 0

    out = capsys.readouterr().out
    for secret in (TOKEN, "discord-secret-token", "sk-openai-secret", "pg-secret"):
        assert secret not in out
    shown = json.loads(out)
    assert shown["engine"]["model"] == "/models/food-lora-3"
    assert shown["telegram"]["token"] == "**********"
    assert shown["database_url"] == "postgresql://dishbot:***@db:5432/dishbot"
    assert TOKEN not in repr(load_settings())


def test_a_database_password_in_the_query_string_is_hidden_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISHBOT_DATABASE_URL", "postgresql://dishbot@db/dishbot?password=pg-secret")

    assert main(["config"]) == 0

    out = capsys.readouterr().out
    assert "pg-secret" not in out
    assert json.loads(out)["database_url"] == "postgresql://dishbot@db/dishbot?password=***"
    assert "pg-secret" in load_settings().secret_values()


def test_a_token_in_a_log_line_or_traceback_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", TOKEN)
    settings = load_settings()
    stream = io.StringIO()
    configure_logging("DEBUG", settings.secret_values(), stream=stream)
    log = logging.getLogger("telegram.ext.Updater")
    try:
        log.warning("POST https://api.telegram.org/bot%s/getUpdates failed", TOKEN)
        try:
            raise ConnectionError(f"cannot reach https://api.telegram.org/bot{TOKEN}/getMe")
        except ConnectionError:
            log.exception("network trouble")
    finally:
        logging.getLogger().handlers.clear()

    text = stream.getvalue()
    assert "getUpdates failed" in text
    assert "Traceback" in text
    assert TOKEN not in text
    assert "bot***/getMe" in text


BACKEND_URL = "http://svc:backend-secret@gpu1/v1"
# Every URL setting with credentials in it; the values stand for what operators write.
URLS_WITH_CREDENTIALS = {
    "DISHBOT_ENGINE__OPENAI__BASE_URL": BACKEND_URL,
    "DISHBOT_TELEGRAM__BASE_URL": "https://tg:tg%40secret@botapi.local/bot",
    "DISHBOT_TELEGRAM__WEBHOOK_URL": "https://hook:hook-secret@bot.example/telegram",
    "DISHBOT_DISCORD__GATEWAY_URL": "wss://gateway-token-secret@gw.local",
    "DISHBOT_DATABASE_URL": "postgresql+asyncpg://u:pg-secret@h/db",
}
URL_SECRETS = ("backend-secret", "tg%40secret", "tg@secret", "hook-secret", "gateway-token-secret")


def test_dishbot_config_hides_the_credentials_in_every_url_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, url in URLS_WITH_CREDENTIALS.items():
        monkeypatch.setenv(name, url)

    assert main(["config"]) == 0

    out = capsys.readouterr().out
    for secret in (*URL_SECRETS, "pg-secret"):
        assert secret not in out
    shown = json.loads(out)
    assert shown["engine"]["openai"]["base_url"] == "http://svc:***@gpu1/v1"
    assert shown["telegram"]["base_url"] == "https://tg:***@botapi.local/bot"
    assert shown["discord"]["gateway_url"] == "wss://***@gw.local"
    assert shown["database_url"] == "postgresql+asyncpg://u:***@h/db"


def test_a_url_password_in_a_log_line_or_an_error_is_redacted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, url in URLS_WITH_CREDENTIALS.items():
        monkeypatch.setenv(name, url)
    stream = io.StringIO()
    configure_logging("DEBUG", load_settings().secret_values(), stream=stream)
    try:
        for url in URLS_WITH_CREDENTIALS.values():
            logging.getLogger("aiohttp.client").warning("POST %s/chat failed", url)
        logging.getLogger("aiohttp.client").warning("login as tg with password tg@secret")
    finally:
        logging.getLogger().handlers.clear()

    def fail(settings: Settings, args: object) -> int:
        raise ConnectionError(f"cannot reach {BACKEND_URL} or {URLS_WITH_CREDENTIALS.values()}")

    monkeypatch.setattr("bot.cli.cmd_config", fail)
    assert main(["config"]) == 1

    shown = stream.getvalue() + capsys.readouterr().err
    assert "POST http://***@gpu1/v1/chat failed" in shown
    assert "dishbot: unexpected error: ConnectionError: cannot reach http://" in shown
    for secret in (*URL_SECRETS, "pg-secret"):
        assert secret not in shown


def _environment_names(model: type[BaseModel], prefix: str = "DISHBOT_") -> list[str]:
    names = []
    for field_name, field in model.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            names += _environment_names(nested, f"{prefix}{field_name.upper()}__")
        else:
            names.append(f"{prefix}{field_name.upper()}")
    return names


def test_the_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")

    missing = [name for name in _environment_names(Settings) if f"`{name}`" not in readme]

    assert missing == []


def test_the_decode_time_budget_reaches_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__DECODE_TIME_BUDGET_S", "1.5")

    config = engine_config(Settings())

    assert config.decode_time_budget_s == 1.5


def test_dishbot_config_hides_a_token_in_a_url_path_and_a_key_in_a_query(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Putting the bot token in the webhook path is common practice for Telegram bots.
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", "123456:AAtoken-in-the-path")
    monkeypatch.setenv("DISHBOT_TELEGRAM__MODE", "webhook")
    monkeypatch.setenv(
        "DISHBOT_TELEGRAM__WEBHOOK_URL", "https://bot.example/123456:AAtoken-in-the-path"
    )
    monkeypatch.setenv("DISHBOT_ENGINE__OPENAI__BASE_URL", "http://gpu1/v1?api-key=q-secret&x=1")

    assert main(["config"]) == 0

    out = capsys.readouterr().out
    assert "AAtoken-in-the-path" not in out
    assert "q-secret" not in out
    shown = json.loads(out)
    assert shown["telegram"]["webhook_url"] == "https://bot.example/***"
    assert shown["engine"]["openai"]["base_url"] == "http://gpu1/v1?api-key=***&x=1"
    assert "q-secret" in Settings().secret_values(), "and the log scrubber knows the key"


def test_every_process_of_one_bot_expects_the_same_made_up_webhook_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Several processes behind one load balancer, and a restart, must all accept the secret
    # the last setWebhook registered; a different bot's must not.
    monkeypatch.setenv("DISHBOT_TELEGRAM__MODE", "webhook")
    monkeypatch.setenv("DISHBOT_TELEGRAM__WEBHOOK_URL", "https://bot.example/telegram")
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", "123456:AA-one-bot")
    first, second = Settings().telegram.webhook_secret, Settings().telegram.webhook_secret
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", "654321:AA-another-bot")
    other = Settings().telegram.webhook_secret

    assert first is not None
    assert second is not None
    assert other is not None
    assert first.get_secret_value() == second.get_secret_value()
    assert other.get_secret_value() != first.get_secret_value()
    assert "AA-one-bot" not in first.get_secret_value()
    assert len(first.get_secret_value()) >= 32
