"""The Discord emulator speaks Discord well enough for the real discord.py.

Each test runs a real ``discord.Client`` (gateway, HTTP, views, dynamic items, a modal and an
app command tree) against the emulator over real sockets, with a few tiny handlers defined
here, and checks what a user of the server would see.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord
import pytest
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from tests.discord_emulator import (
    EPHEMERAL,
    INTERACTION_ACK_DEADLINE_S,
    LOADING,
    ApiObject,
    DiscordEmulator,
    Op,
)

# How long a test waits for the bot to react before failing; a guard, never a measurement.
GUARD_S = 10.0
CALLBACK = "POST /interactions/{interaction_id}/{token}/callback"
CREATE_MESSAGE = "POST /channels/{channel_id}/messages"
LABELS = {"up": "👍", "down": "👎", "fix": "✏️"}


class RateButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=r"rate:(?P<answer>[0-9]+):(?P<verdict>up|down|fix)",
):
    """A persistent rating button whose custom_id carries the answer it rates."""

    def __init__(self, answer: int, verdict: str) -> None:
        button: discord.ui.Button[discord.ui.View] = discord.ui.Button(
            label=LABELS[verdict], custom_id=f"rate:{answer}:{verdict}"
        )
        super().__init__(button)
        self.answer = answer
        self.verdict = verdict

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> RateButton:
        return cls(int(match["answer"]), match["verdict"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        if self.verdict == "fix":
            await interaction.response.send_modal(CorrectionModal(self.answer))
            return
        await interaction.response.send_message(f"Rated {self.verdict}", ephemeral=True)
        interaction.client.ratings.put_nowait((self.answer, self.verdict, interaction.user.id))


class CorrectionModal(discord.ui.Modal):
    def __init__(self, answer: int) -> None:
        super().__init__(title="Correct the answer", custom_id=f"correction:{answer}")
        self.answer = answer
        self.text: discord.ui.TextInput[CorrectionModal] = discord.ui.TextInput(
            label="What is it really?", custom_id="text", max_length=500
        )
        self.add_item(self.text)

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.response.send_message("Noted, thanks.", ephemeral=True)
        interaction.client.corrections.put_nowait((self.answer, self.text.value))


@app_commands.command(name="dish", description="Ask about a dish photo")
async def dish_command(
    interaction: discord.Interaction[Any], photo: discord.Attachment, question: str
) -> None:
    await interaction.response.defer(thinking=True)
    data = await photo.read()
    answer = f"{question} {len(data)} bytes"
    await interaction.followup.send(answer)  # replaces the "thinking..." message
    await interaction.followup.send("Rate it:", view=rating_view(8))
    await interaction.edit_original_response(content=f"{answer}, final")


def rating_view(answer: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for verdict in LABELS:
        view.add_item(RateButton(answer, verdict))
    return view


class ExampleClient(discord.Client):
    """The smallest client that exercises what dishbot's adapter needs from the platform."""

    def __init__(self, intents: discord.Intents | None = None) -> None:
        if intents is None:
            intents = discord.Intents.default()
            intents.message_content = True
        # READY waits guild_ready_timeout after the last GUILD_CREATE; 2 s by default.
        super().__init__(intents=intents, guild_ready_timeout=0.05)
        self.tree = app_commands.CommandTree(self)
        self.tree.add_command(dish_command)
        self.messages: asyncio.Queue[discord.Message] = asyncio.Queue()
        self.ratings: asyncio.Queue[tuple[int, str, int]] = asyncio.Queue()
        self.corrections: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    async def setup_hook(self) -> None:
        self.add_dynamic_items(RateButton)

    async def on_message(self, message: discord.Message) -> None:
        assert self.user is not None
        if message.author.id != self.user.id:
            self.messages.put_nowait(message)


@dataclass(frozen=True)
class Place:
    """A server with one text channel, and two users."""

    guild_id: int
    channel_id: int
    ada: ApiObject
    lin: ApiObject


def point_discord_py_at(emulator: DiscordEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord.http.Route, "BASE", emulator.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(emulator.gateway_url))


@pytest.fixture
async def emulator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator() as emulator:
        point_discord_py_at(emulator, monkeypatch)
        yield emulator


@pytest.fixture
def place(emulator: DiscordEmulator) -> Place:
    guild_id = emulator.add_guild("Foodies")
    return Place(
        guild_id,
        emulator.add_channel(guild_id, "dishes"),
        emulator.add_user("ada"),
        emulator.add_user("lin", global_name="林"),
    )


async def start(client: discord.Client, token: str) -> asyncio.Task[None]:
    """Log in and connect; returns once the client is ready (or raises its failure)."""
    await client.login(token)
    running = asyncio.create_task(client.connect())
    ready = asyncio.create_task(client.wait_until_ready())
    await asyncio.wait({running, ready}, timeout=GUARD_S, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        await client.close()
        running.result()  # the failure, if connect ended with one
        raise TimeoutError("the client did not become ready")
    return running


async def stop(client: discord.Client, running: asyncio.Task[None]) -> None:
    await client.close()
    await asyncio.wait_for(running, GUARD_S)


def logged_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Errors discord.py logs instead of raising (a failing callback, a lost task)."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith(("discord", "asyncio")) and record.levelno >= logging.ERROR
    ]


@pytest.fixture
async def client(
    emulator: DiscordEmulator, place: Place, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[ExampleClient]:
    client = ExampleClient()
    running = await start(client, emulator.token)
    yield client
    await stop(client, running)
    assert logged_errors(caplog) == []


def text_channel(client: discord.Client, place: Place) -> discord.TextChannel:
    channel = client.get_channel(place.channel_id)
    assert isinstance(channel, discord.TextChannel)
    return channel


async def test_login_reaches_ready_with_the_guild_cache_filled(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    assert client.user is not None
    assert client.user.id == emulator.bot_id
    assert client.application_id == emulator.application_id
    guild = client.get_guild(place.guild_id)
    assert guild is not None
    assert guild.name == "Foodies"
    assert [channel.name for channel in guild.text_channels] == ["dishes"]
    assert guild.me.id == emulator.bot_id
    [identify] = emulator.received_frames(Op.IDENTIFY)
    assert identify["d"]["token"] == emulator.token
    assert identify["d"]["intents"] == client.intents.value
    routes = [call.route for call in emulator.calls()]
    assert routes == ["GET /users/@me", "GET /oauth2/applications/@me"]


async def test_a_message_with_an_attachment_reaches_on_message_and_downloads(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    jpeg = b"\xff\xd8 a char siu photo \xff\xd9"
    photo = emulator.add_file(jpeg, "char-siu.jpg")

    sent = emulator.send_message(
        place.channel_id, place.ada, "what is this?", [photo], mentions_bot=True
    )
    message = await asyncio.wait_for(client.messages.get(), GUARD_S)

    assert message.id == int(sent["id"])
    assert message.content == f"<@{emulator.bot_id}> what is this?"
    assert client.user in message.mentions
    assert message.guild is not None
    assert (message.guild.id, message.channel.id) == (place.guild_id, place.channel_id)
    assert message.author.id == int(place.ada["id"])
    [attachment] = message.attachments
    assert (attachment.filename, attachment.content_type) == ("char-siu.jpg", "image/jpeg")
    assert attachment.size == len(jpeg)
    assert await attachment.read() == jpeg
    assert len(emulator.calls("GET /attachments/{attachment_id}/{filename}")) == 1


async def test_without_the_message_content_intent_only_mentions_and_dms_carry_content(
    emulator: DiscordEmulator, place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    client = ExampleClient(discord.Intents.default())
    running = await start(client, emulator.token)
    photo = emulator.add_file(b"jpeg", "dish.jpg")
    dm_channel = emulator.add_dm_channel(place.ada)

    emulator.send_message(place.channel_id, place.ada, "just chatting", [photo])
    emulator.send_message(place.channel_id, place.ada, "what is this?", [photo], mentions_bot=True)
    emulator.send_message(dm_channel, place.ada, "and in private?", [photo])
    chat, mention, private = [
        await asyncio.wait_for(client.messages.get(), GUARD_S) for _ in range(3)
    ]
    await stop(client, running)

    assert (chat.content, chat.attachments) == ("", [])
    assert mention.content.endswith("what is this?")
    assert len(mention.attachments) == 1
    assert private.content == "and in private?"
    assert len(private.attachments) == 1
    assert logged_errors(caplog) == []


async def test_asking_for_an_intent_the_portal_does_not_grant_fails_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with DiscordEmulator(message_content_enabled=False) as emulator:
        point_discord_py_at(emulator, monkeypatch)
        client = ExampleClient()
        try:
            with pytest.raises(discord.PrivilegedIntentsRequired):
                await asyncio.wait_for(client.start(emulator.token), GUARD_S)
        finally:
            await client.close()


async def test_a_dm_and_replies_carry_their_context(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    dm_channel = emulator.add_dm_channel(place.ada)

    emulator.send_message(dm_channel, place.ada, "hello bot")
    greeting = await asyncio.wait_for(client.messages.get(), GUARD_S)
    reply = await greeting.reply("hello Ada")
    emulator.send_message(dm_channel, place.ada, "and this?", reply_to=reply.id)
    follow_up = await asyncio.wait_for(client.messages.get(), GUARD_S)

    assert greeting.guild is None
    assert isinstance(greeting.channel, discord.DMChannel)
    [shown] = emulator.messages_in(dm_channel)
    assert shown["content"] == "hello Ada"
    assert shown["message_reference"]["message_id"] == str(greeting.id)
    assert follow_up.reference is not None
    assert follow_up.reference.message_id == reply.id
    assert isinstance(follow_up.reference.resolved, discord.Message)
    assert follow_up.reference.resolved.author == client.user
    assert client.user in follow_up.mentions


async def test_a_view_with_buttons_is_sent_as_components(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    sent = await text_channel(client, place).send("Char siu.", view=rating_view(7))

    [shown] = emulator.messages_in(place.channel_id)
    assert shown["id"] == str(sent.id)
    [row] = shown["components"]
    assert [(b["type"], b["label"], b["custom_id"]) for b in row["components"]] == [
        (2, "👍", "rate:7:up"),
        (2, "👎", "rate:7:down"),
        (2, "✏️", "rate:7:fix"),
    ]


async def test_the_bots_uploads_edits_deletions_and_typing_show_in_the_channel(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    channel = text_channel(client, place)
    export = discord.File(io.BytesIO(b"rating,dish\n1,char siu\n"), "export.csv")

    async with channel.typing():
        sent = await channel.send("draft", file=export)
    await sent.edit(content="final")
    doomed = await channel.send("oops")
    await doomed.delete()

    assert len(emulator.calls("POST /channels/{channel_id}/typing")) == 1
    upload = emulator.calls(CREATE_MESSAGE)[0]
    assert upload.json["content"] == "draft"
    assert [(f.field, f.filename) for f in upload.files] == [("files[0]", "export.csv")]
    [shown] = emulator.messages_in(place.channel_id)
    assert shown["content"] == "final"
    assert shown["edited_timestamp"] is not None
    [attachment] = shown["attachments"]
    assert (attachment["filename"], attachment["content_type"]) == ("export.csv", "text/csv")
    assert await sent.attachments[0].read() == b"rating,dish\n1,char siu\n"


async def test_a_server_and_channel_added_while_connected_reach_the_cache(
    emulator: DiscordEmulator, client: ExampleClient
) -> None:
    joined = client.wait_for("guild_join", timeout=GUARD_S)  # listens from this call on
    guild_id = emulator.add_guild("Noodle Club")
    guild = await joined
    created = client.wait_for("guild_channel_create", timeout=GUARD_S)
    channel_id = emulator.add_channel(guild_id, "ramen")
    channel = await created

    assert (guild.id, guild.name) == (guild_id, "Noodle Club")
    assert (channel.id, channel.name, channel.guild) == (channel_id, "ramen", guild)
    assert len(client.guilds) == 2


async def test_a_429_on_message_create_is_retried_and_the_message_arrives(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    emulator.fail_next(CREATE_MESSAGE, retry_after=0.05)

    await text_channel(client, place).send("are you there?")

    refused, delivered = emulator.calls(CREATE_MESSAGE)
    assert (refused.status, refused.response["retry_after"]) == (429, 0.05)
    assert delivered.status == 200
    assert [m["content"] for m in emulator.messages_in(place.channel_id)] == ["are you there?"]


async def test_a_button_press_reaches_the_dynamic_item_and_is_acknowledged(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    sent = await text_channel(client, place).send("Char siu.", view=rating_view(7))

    interaction = emulator.press_button(sent.id, "rate:7:up", place.lin)
    rating = await asyncio.wait_for(client.ratings.get(), GUARD_S)
    callback = await emulator.wait_for(CALLBACK)

    assert rating == (7, "up", int(place.lin["id"]))
    assert (callback.status, callback.query) == (200, {"with_response": "1"})
    [response] = emulator.interaction_responses(interaction["id"])
    assert (response["type"], response["data"]["content"]) == (4, "Rated up")
    delay = emulator.acknowledgement_delay(interaction["id"])
    assert delay is not None
    assert delay < INTERACTION_ACK_DEADLINE_S
    thanks = emulator.messages_in(place.channel_id)[-1]
    assert thanks["content"] == "Rated up"
    assert thanks["flags"] & EPHEMERAL


async def test_a_button_on_a_message_sent_before_a_restart_reaches_the_new_client(
    emulator: DiscordEmulator, place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    first = ExampleClient()
    running = await start(first, emulator.token)
    sent = await text_channel(first, place).send("Char siu.", view=rating_view(7))
    await stop(first, running)
    await emulator.wait_until(lambda: not emulator.connected)

    second = ExampleClient()
    running = await start(second, emulator.token)
    emulator.press_button(sent.id, "rate:7:down", place.ada)
    rating = await asyncio.wait_for(second.ratings.get(), GUARD_S)
    await stop(second, running)

    assert rating == (7, "down", int(place.ada["id"]))
    assert len(emulator.received_frames(Op.IDENTIFY)) == 2
    assert logged_errors(caplog) == []


async def test_a_modal_opened_from_a_button_is_submitted(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    sent = await text_channel(client, place).send("Char siu.", view=rating_view(7))

    emulator.press_button(sent.id, "rate:7:fix", place.ada)
    opened = await emulator.wait_for(CALLBACK)
    submission = emulator.submit_modal("correction:7", {"text": "roast duck"}, place.ada)
    correction = await asyncio.wait_for(client.corrections.get(), GUARD_S)
    await emulator.wait_for_calls(CALLBACK, 2)

    assert (opened.json["type"], opened.json["data"]["custom_id"]) == (9, "correction:7")
    assert correction == (7, "roast duck")
    assert submission["message"]["id"] == str(sent.id)
    [response] = emulator.interaction_responses(submission["id"])
    assert (response["type"], response["data"]["content"]) == (4, "Noted, thanks.")
    with pytest.raises(ValueError, match="no open modal"):
        emulator.submit_modal("correction:7", {"text": "again"}, place.ada)


async def test_synced_slash_command_with_an_attachment_is_invoked_and_answered(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    guild = discord.Object(place.guild_id)
    synced = await client.tree.sync()
    client.tree.copy_global_to(guild=guild)
    await client.tree.sync(guild=guild)
    photo = emulator.add_file(b"jpeg bytes", "dish.jpg")

    interaction = emulator.slash_command(
        "dish", {"photo": photo, "question": "Is it spicy?"}, place.ada, place.channel_id
    )
    await emulator.wait_for("PATCH /webhooks/{application_id}/{token}/messages/@original")

    assert [command.name for command in synced] == ["dish"]
    [put] = emulator.calls("PUT /applications/{application_id}/commands")
    assert [option["type"] for option in put.json[0]["options"]] == [11, 3]  # attachment, str
    [guild_command] = emulator.commands(place.guild_id)
    assert interaction["data"]["guild_id"] == guild_command["guild_id"] == str(place.guild_id)
    assert interaction["data"]["resolved"]["attachments"] == {photo["id"]: photo}
    [deferral] = emulator.interaction_responses(interaction["id"])
    assert deferral["type"] == 5
    delay = emulator.acknowledgement_delay(interaction["id"])
    assert delay is not None
    assert delay < INTERACTION_ACK_DEADLINE_S
    answer, rate = emulator.messages_in(place.channel_id)
    assert answer["content"] == "Is it spicy? 10 bytes, final"
    assert not answer["flags"] & LOADING
    assert answer["interaction_metadata"]["user"]["id"] == place.ada["id"]
    assert rate["content"] == "Rate it:"
    assert rate["components"][0]["components"][0]["custom_id"] == "rate:8:up"


async def test_content_over_2000_characters_is_refused_as_discord_does(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    channel = text_channel(client, place)

    with pytest.raises(discord.HTTPException) as refused:
        await channel.send("好" * 2001)
    await channel.send("好" * 2000)

    assert (refused.value.status, refused.value.code) == (400, 50035)
    assert "In content: Must be 2000 or fewer in length." in str(refused.value)
    assert [len(m["content"]) for m in emulator.messages_in(place.channel_id)] == [2000]


async def test_a_dropped_gateway_connection_resumes_and_replays_missed_events(
    emulator: DiscordEmulator, place: Place, client: ExampleClient
) -> None:
    await emulator.disconnect()
    emulator.send_message(place.channel_id, place.ada, "sent while you were away")

    message = await asyncio.wait_for(client.messages.get(), GUARD_S)

    assert message.content == "sent while you were away"
    [resume] = emulator.received_frames(Op.RESUME)
    assert resume["d"]["session_id"] == client.ws.session_id
    assert len(emulator.received_frames(Op.IDENTIFY)) == 1


async def test_the_client_closes_cleanly(
    emulator: DiscordEmulator, place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    client = ExampleClient()
    running = await start(client, emulator.token)

    await stop(client, running)
    await emulator.wait_until(lambda: not emulator.connected)

    assert client.is_closed()
    pending = [task for task in asyncio.all_tasks() if _runs_discord_code(task)]
    assert pending == []
    for thread in threading.enumerate():
        if thread.name.startswith("keep-alive-handler"):
            await asyncio.to_thread(thread.join, GUARD_S)
            assert not thread.is_alive()
    assert logged_errors(caplog) == []


def _runs_discord_code(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return not task.done() and code is not None and "/discord/" in code.co_filename


async def rest(
    emulator: DiscordEmulator,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    """A raw request to the emulator's REST API, as the bot token or none."""
    headers = {} if token is None else {"Authorization": f"Bot {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, emulator.api_base + path, json=body, headers=headers) as answer,
    ):
        data = await answer.json(content_type=None) if answer.status != 204 else None
        return answer.status, dict(answer.headers), data


async def test_rest_answers_have_discords_exact_headers_and_errors(
    emulator: DiscordEmulator, place: Place
) -> None:
    token = emulator.token
    status, headers, me = await rest(emulator, "GET", "/users/@me", token=token)
    assert (status, headers["Content-Type"], me["id"]) == (200, "application/json", me["id"])
    assert me["id"] == str(emulator.bot_id)

    emulator.fail_next("GET /users/@me", retry_after=0.25)
    status, headers, body = await rest(emulator, "GET", "/users/@me", token=token)
    assert (status, headers["Via"], body["retry_after"]) == (429, "1.1 google", 0.25)

    status, _, body = await rest(emulator, "GET", "/users/@me", token="wrong")
    assert (status, body) == (401, {"message": "401: Unauthorized", "code": 0})

    status, headers, body = await rest(emulator, "GET", "/guilds/1/bans", token=token)
    assert (status, headers["Content-Type"]) == (404, "application/json")
    assert body == {"message": "404: Not Found", "code": 0}
    assert [call.path for call in emulator.unhandled] == ["/guilds/1/bans"]

    status, _, body = await rest(
        emulator, "POST", f"/channels/{place.channel_id}/messages", {"content": ""}, token
    )
    assert (status, body["code"]) == (400, 50006)


async def test_interaction_callbacks_late_repeated_or_premature_are_refused(
    emulator: DiscordEmulator, place: Place
) -> None:
    token = emulator.token
    button = {"type": 2, "style": 1, "label": "👍", "custom_id": "rate:1:up"}
    body = {"content": "Rate it", "components": [{"type": 1, "components": [button]}]}
    _, _, sent = await rest(emulator, "POST", f"/channels/{place.channel_id}/messages", body, token)
    first = emulator.press_button(int(sent["id"]), "rate:1:up", place.ada)
    followups = f"/webhooks/{emulator.application_id}/{first['token']}"
    callback = f"/interactions/{first['id']}/{first['token']}/callback"

    status, _, body = await rest(emulator, "POST", followups, {"content": "too soon"})
    assert (status, body["code"]) == (404, 10015)
    status, _, answered = await rest(emulator, "POST", callback, {"type": 6})
    assert (status, answered["interaction"]["response_message_id"]) == (200, sent["id"])
    status, _, body = await rest(emulator, "POST", callback, {"type": 6})
    assert (status, body["code"]) == (400, 40060)

    emulator.ack_deadline_s = 0.0
    late = emulator.press_button(int(sent["id"]), "rate:1:up", place.lin)
    late_callback = f"/interactions/{late['id']}/{late['token']}/callback"
    status, _, body = await rest(emulator, "POST", late_callback, {"type": 6})
    assert (status, body["code"]) == (404, 10062)
