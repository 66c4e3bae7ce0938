"""The chat platforms: each token, when set, is accepted by its platform."""

from __future__ import annotations

from urllib.parse import urlsplit

from bot.doctor.context import Context
from bot.doctor.findings import Finding, fail, ok, with_fix
from bot.doctor.http import Unreachable, get_json
from bot.settings import TelegramSettings

DISCORD_API = "https://discord.com/api/v10"
TELEGRAM_TOKEN = "DISHBOT_TELEGRAM__TOKEN"
DISCORD_TOKEN = "DISHBOT_DISCORD__TOKEN"
# The only ports setWebhook accepts (core.telegram.org/bots/api#setwebhook).
WEBHOOK_PORTS = (443, 80, 88, 8443)


async def check_telegram(context: Context) -> Finding:
    """Telegram: off without a token; with one, getMe accepts it; a webhook is HTTPS."""
    telegram = context.settings.telegram
    if telegram.token is None:
        return ok("telegram", f"not set: Telegram off (set {TELEGRAM_TOKEN})")
    webhook = _webhook_problem(telegram)
    if webhook is not None:
        return fail("telegram", webhook)
    token = telegram.token.get_secret_value()
    api = _origin(telegram.base_url)
    try:
        answer = await get_json(f"{telegram.base_url}{token}/getMe", trust_env=True)
    except Unreachable as exc:
        return fail(
            "telegram",
            with_fix(
                f"cannot reach {api}: {exc}",
                "check the network, or DISHBOT_TELEGRAM__BASE_URL (for a self-hosted Bot API)",
            ),
        )
    if answer.status in (401, 404):  # 404: not even shaped like a token
        return fail(
            "telegram",
            with_fix(
                f"token rejected by {api} ({answer.status})",
                f"set {TELEGRAM_TOKEN} to the token @BotFather gave you",
            ),
        )
    user = _result(answer.body)
    if answer.status != 200 or user is None:
        return fail(
            "telegram",
            with_fix(f"{api} answered getMe with {answer.status}", "try again later"),
        )
    mode = f"webhook at {telegram.webhook_url}" if telegram.mode == "webhook" else "polling"
    return ok("telegram", f"@{user.get('username', '?')} ({mode})")


def _webhook_problem(telegram: TelegramSettings) -> str | None:
    """What Telegram would refuse about the webhook settings (they are validated otherwise)."""
    if telegram.mode != "webhook":
        return None
    url = telegram.webhook_url or ""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return with_fix(
            f"webhook_url {url or '(unset)'} is not an https:// URL, and Telegram posts "
            "updates only over HTTPS",
            "set DISHBOT_TELEGRAM__WEBHOOK_URL to the public https:// URL of your proxy, "
            "or DISHBOT_TELEGRAM__MODE=polling",
        )
    try:
        port = parts.port or 443
    except ValueError:
        port = -1
    if port not in WEBHOOK_PORTS:
        allowed = ", ".join(str(p) for p in WEBHOOK_PORTS)
        return with_fix(
            f"webhook_url {url} is on port {port}, and Telegram posts only to ports {allowed}",
            "put the public https:// URL on one of those ports in DISHBOT_TELEGRAM__WEBHOOK_URL",
        )
    return None


def _result(body: object) -> dict[str, object] | None:
    if not isinstance(body, dict) or not body.get("ok"):
        return None
    result = body.get("result")
    return result if isinstance(result, dict) else None


def _origin(url: str) -> str:
    """Where a URL points, without its path (Telegram's carries the token after it)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url


async def check_discord(context: Context) -> Finding:
    """Discord: off without a token; with one, GET /users/@me accepts it."""
    discord = context.settings.discord
    if discord.token is None:
        return ok("discord", f"not set: Discord off (set {DISCORD_TOKEN})")
    api = (discord.api_base or DISCORD_API).rstrip("/")
    headers = {"Authorization": f"Bot {discord.token.get_secret_value()}"}
    try:
        answer = await get_json(f"{api}/users/@me", headers)
    except Unreachable as exc:
        return fail(
            "discord",
            with_fix(
                f"cannot reach {api}: {exc}", "check the network, or DISHBOT_DISCORD__API_BASE"
            ),
        )
    if answer.status == 401:
        return fail(
            "discord",
            with_fix(
                f"token rejected by {_origin(api)} (401)",
                f"set {DISCORD_TOKEN} to the bot token from the Developer Portal (Bot → Token)",
            ),
        )
    body = answer.body
    if answer.status != 200 or not isinstance(body, dict):
        return fail("discord", with_fix(f"{api} answered {answer.status}", "try again later"))
    return ok("discord", f"logged in as {body.get('username', '?')} (id {body.get('id', '?')})")
