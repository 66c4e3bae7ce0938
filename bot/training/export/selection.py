"""Which answers may be trained on, and what the model should learn from each.

The rules, applied to one answer at a time:

* Feedback from banned users and users of negative trust is ignored, and so are the
  questions they asked.
* An accepted correction makes the answer a sample whose target is built from the
  correction. A correction is accepted when an admin gave it, an admin accepted it in
  review, a trusted user (trust above 0) gave it, or at least K distinct users gave the
  same one once case, width, punctuation and whitespace are set aside. When several are
  accepted, the strongest kind wins (admin, reviewed, trusted, agreed, in that order); a
  tie within the kind is a dispute and holds the answer back, except between admins,
  where the latest word stands. Rejected corrections count for nothing.
  An admin's verdict in review (the web console's Review page: `Store.accept_correction`,
  `Store.reject_corrections`) thereby overrides agreement: an accepted correction is
  trained on however few users gave it, rejected ones stay out however many did.
* Otherwise an answer with at least ``min_votes`` more 👍 than 👎 is a sample whose target
  is the model's own answer.
* Everything else is held back or excluded, and the reason is counted.
"""

from __future__ import annotations

import enum
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from bot.store.feedback import CorrectionFeedback, ExchangeFeedback
from bot.store.models import CorrectionStatus, ExchangeStatus
from bot.training.export.targets import target_from_correction
from bot.training.export.text import clean_turn_text, comparison_key


class Fate(enum.StrEnum):
    """What became of an answer, or of a sample; the value is how the summary words it."""

    EXPORTED = "exported"
    UNRATED = "unrated"
    TOO_FEW_VOTES = "too few votes"
    NET_NEGATIVE = "net-negative"
    CORRECTION_NOT_ACCEPTED = "correction not accepted yet"
    CORRECTIONS_DISAGREE = "accepted corrections disagree"
    NOT_ANSWERED = "not answered"
    BANNED_ASKER = "asked by a banned user"
    EMPTY = "empty once cleaned"
    AFTER_UNQUALIFIED_TURN = "follows a turn that does not qualify"
    DUPLICATE = "duplicate"
    TOO_LONG = "too long"
    USER_CAP = "over the per-user cap"
    PHOTO_MISSING = "photo file missing or damaged"


# Net-negative answers are excluded for good; the other reasons may pass on a later export.
EXCLUDED_FATES = frozenset({Fate.NET_NEGATIVE, Fate.BANNED_ASKER, Fate.EMPTY, Fate.NOT_ANSWERED})


class Evidence(enum.IntEnum):
    """Why a turn is trusted, weakest first; a stronger duplicate wins."""

    UNRATED = 0
    RATED = 1
    AGREED = 2
    TRUSTED = 3
    REVIEWED = 4
    ADMIN = 5


@dataclass(frozen=True, slots=True)
class SelectionRules:
    """The knobs of selection: votes needed, users who must agree, and who is an admin."""

    min_votes: int
    agreeing_corrections: int
    is_admin: Callable[[str, str], bool]


@dataclass(frozen=True, slots=True)
class TurnJudgement:
    """The verdict on one answer.

    ``fate`` is None when the answer qualifies; ``target`` is then what to train on. An
    unrated answer also carries its target, usable as context before a qualifying turn.
    ``accountable`` are the non-admin users whose word the sample would carry (the asker,
    the authors of an accepted correction): the per-user cap counts against them.
    """

    fate: Fate | None
    target: str | None = None
    evidence: Evidence = Evidence.UNRATED
    net_votes: int = 0
    accountable: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class _Accepted:
    text: str
    evidence: Evidence
    authors: frozenset[int]


def judge_turn(exchange: ExchangeFeedback, rules: SelectionRules) -> TurnJudgement:
    """Whether ``exchange``'s answer qualifies as a training target, and if so, as what."""
    if exchange.status is not ExchangeStatus.ANSWERED:
        return TurnJudgement(Fate.NOT_ANSWERED)
    if exchange.asker.ignored:
        return TurnJudgement(Fate.BANNED_ASKER)
    net_votes = exchange.votes_up - exchange.votes_down
    asker_is_admin = rules.is_admin(exchange.asker.platform, exchange.asker.platform_user_id)
    asker = frozenset() if asker_is_admin else frozenset({exchange.asker.id})
    counted = [c for c in exchange.corrections if _counts(c)]
    accepted = _accepted_correction(counted, rules)
    if isinstance(accepted, _Accepted):
        target = target_from_correction(accepted.text, exchange.question)
        if not target:
            return TurnJudgement(Fate.EMPTY)
        # Admins answer for their own corrections; anyone else counts against the cap.
        authors = frozenset() if accepted.evidence is Evidence.ADMIN else accepted.authors
        return TurnJudgement(None, target, accepted.evidence, net_votes, asker | authors)
    answer = clean_turn_text(exchange.answer or "")
    if not answer:
        return TurnJudgement(Fate.EMPTY)
    if net_votes >= rules.min_votes:
        return TurnJudgement(None, answer, Evidence.RATED, net_votes, asker)
    if accepted is Fate.CORRECTIONS_DISAGREE:
        return TurnJudgement(Fate.CORRECTIONS_DISAGREE, net_votes=net_votes)
    if counted:
        return TurnJudgement(Fate.CORRECTION_NOT_ACCEPTED, net_votes=net_votes)
    if net_votes < 0:
        return TurnJudgement(Fate.NET_NEGATIVE, net_votes=net_votes)
    if exchange.votes_up or exchange.votes_down:
        return TurnJudgement(Fate.TOO_FEW_VOTES, net_votes=net_votes)
    return TurnJudgement(Fate.UNRATED, answer, Evidence.UNRATED, 0, asker)


def ignored_corrections(exchange: ExchangeFeedback) -> int:
    """How many of an answer's corrections come from banned or distrusted users."""
    return sum(1 for c in exchange.corrections if c.author.ignored)


def _counts(correction: CorrectionFeedback) -> bool:
    return not correction.author.ignored and correction.status is not CorrectionStatus.REJECTED


def _accepted_correction(
    corrections: Sequence[CorrectionFeedback], rules: SelectionRules
) -> _Accepted | Fate | None:
    """The accepted correction, `Fate.CORRECTIONS_DISAGREE` on a dispute, or None."""
    if not corrections:
        return None
    by_admins = [
        c for c in corrections if rules.is_admin(c.author.platform, c.author.platform_user_id)
    ]
    if by_admins:
        latest = max(by_admins, key=lambda c: (c.updated_at, c.id))
        return _Accepted(latest.text, Evidence.ADMIN, frozenset({latest.author.id}))
    reviewed = [c for c in corrections if c.status is CorrectionStatus.ACCEPTED]
    if reviewed:
        return _most_agreed(reviewed, Evidence.REVIEWED)
    trusted = [c for c in corrections if c.author.trust > 0]
    if trusted:
        return _most_agreed(trusted, Evidence.TRUSTED)
    groups = _agreeing_groups(corrections)
    agreed = [group for group in groups if len(group) >= rules.agreeing_corrections]
    if agreed:
        return _most_agreed([c for group in agreed for c in group], Evidence.AGREED)
    return None


def _agreeing_groups(
    corrections: Iterable[CorrectionFeedback],
) -> list[list[CorrectionFeedback]]:
    """Corrections grouped by what they say once compared loosely, each user once."""
    groups: dict[str, dict[int, CorrectionFeedback]] = defaultdict(dict)
    for correction in corrections:
        groups[comparison_key(correction.text)].setdefault(correction.author.id, correction)
    return [list(group.values()) for key, group in groups.items() if key]


def _most_agreed(
    corrections: Sequence[CorrectionFeedback], evidence: Evidence
) -> _Accepted | Fate | None:
    """The correction the most users gave; a tie between different ones is a dispute."""
    groups = sorted(_agreeing_groups(corrections), key=len, reverse=True)
    if not groups:
        return None  # nothing but punctuation
    if len(groups) > 1 and len(groups[0]) == len(groups[1]):
        return Fate.CORRECTIONS_DISAGREE
    winners = groups[0]
    # Of the spellings of the agreed correction, the most common, then the earliest.
    spellings = Counter(c.text.strip() for c in winners)
    first_seen = {c.text.strip(): c.id for c in sorted(winners, key=lambda c: c.id, reverse=True)}
    text = max(spellings, key=lambda s: (spellings[s], -first_seen[s]))
    return _Accepted(text, evidence, frozenset(c.author.id for c in winners))
