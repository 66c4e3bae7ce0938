"""What an admin may choose about one export, and reading the dates they type."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from bot.training.export.errors import ExportError

_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """Filters and split of one export.

    ``since`` (included) and ``until`` (excluded) bound when a conversation's first
    question was asked, in UTC. ``val_fraction`` of the photos go to validation.
    ``min_votes``: how many more 👍 than 👎 an answer needs. ``include_unrated``: an
    unrated turn may stand as context before a later turn that qualifies in the same
    conversation (it is never a sample on its own).
    """

    since: datetime | None = None
    until: datetime | None = None
    val_fraction: float = 0.1
    min_votes: int = 1
    include_unrated: bool = False

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None and moment.tzinfo is None:
                raise ExportError(f"{name} must say its time zone (or be given as UTC)")
        if self.since and self.until and self.since >= self.until:
            raise ExportError("since must be before until")
        if not 0 <= self.val_fraction < 1:
            raise ExportError(
                f"the validation fraction must be at least 0 and below 1, not {self.val_fraction}"
            )
        if self.min_votes < 1:
            raise ExportError(f"min votes must be at least 1, not {self.min_votes}")

    def includes(self, moment: datetime) -> bool:
        """Whether a conversation that started at ``moment`` is within the date range."""
        if self.since is not None and moment < self.since:
            return False
        return self.until is None or moment < self.until


def parse_moment(text: str, *, end_of_day: bool = False) -> datetime:
    """A date (``YYYY-MM-DD``) or an ISO 8601 date and time, as an aware UTC datetime.

    A time without a zone is taken as UTC. A bare date means the start of that day, or with
    ``end_of_day`` the start of the next, so that ``until 2025-03-31`` includes the 31st.
    """
    text = text.strip()
    try:
        if _DATE_ONLY.match(text):
            day = date.fromisoformat(text) + timedelta(days=1 if end_of_day else 0)
            return datetime.combine(day, time(), tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ExportError(
            f"{text!r} is not a date: write YYYY-MM-DD or an ISO time like 2025-03-31T18:00+08:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
