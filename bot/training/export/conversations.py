"""From the exchanges about one photo to candidate samples: conversations and their turns.

A conversation is a chain of follow-ups about the same photo, each exchange pointing at the
one it followed. It becomes one multi-turn sample when every turn in it qualifies. XTuner
trains on every answer of a record, so a turn that does not qualify cannot stay in: the
sample is the conversation up to it, and the later turns wait (they were asked in the
light of that answer). With ``include_unrated``, an unrated turn may stand as context before
a later turn that qualifies; a sample never ends on one.

Follow-ups can branch (two people in a group replying to the same answer); each branch is
its own conversation, and the shared start collapses as a duplicate where it repeats.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bot.store.feedback import ExchangeFeedback
from bot.training.export.selection import Evidence, Fate, TurnJudgement
from bot.training.export.text import clean_turn_text, comparison_key


@dataclass(frozen=True, slots=True)
class Turn:
    """One question of a sample and the answer to train on."""

    exchange: ExchangeFeedback
    question: str
    answer: str
    judgement: TurnJudgement


@dataclass(frozen=True, slots=True)
class CandidateSample:
    """A conversation about one photo that may become one training record."""

    turns: tuple[Turn, ...]

    @property
    def record_id(self) -> str:
        """Named after the last exchange, which only this conversation ends at."""
        return f"exchange-{self.turns[-1].exchange.id}"

    @property
    def duplicate_key(self) -> tuple[str, ...]:
        """Samples of the same photo with the same questions are duplicates."""
        return tuple(comparison_key(turn.question) for turn in self.turns)

    @property
    def strength(self) -> tuple[int, int, int]:
        """Which of several duplicates to keep: the better vouched for, then the newer."""
        evidence = sum(int(turn.judgement.evidence) for turn in self.turns)
        votes = sum(turn.judgement.net_votes for turn in self.turns)
        return evidence, votes, self.turns[-1].exchange.id

    @property
    def accountable(self) -> frozenset[int]:
        """The users the per-user cap counts this sample against."""
        return frozenset().union(*(turn.judgement.accountable for turn in self.turns))

    @property
    def exchange_ids(self) -> tuple[int, ...]:
        """The exchanges whose answers the sample carries."""
        return tuple(turn.exchange.id for turn in self.turns)


@dataclass(frozen=True, slots=True)
class PhotoConversations:
    """Every candidate sample about one photo, and the fate of the turns left out of them."""

    candidates: tuple[CandidateSample, ...]
    left_out: Mapping[int, Fate]


def conversation_paths(exchanges: Sequence[ExchangeFeedback]) -> list[list[ExchangeFeedback]]:
    """Every chain from a first question to a last follow-up, oldest first.

    ``exchanges`` are those about one photo, in id order; an exchange whose parent is not
    among them starts a conversation.
    """
    by_id = {exchange.id: exchange for exchange in exchanges}
    children: dict[int, list[ExchangeFeedback]] = defaultdict(list)
    roots: list[ExchangeFeedback] = []
    for exchange in exchanges:
        if exchange.parent_id is not None and exchange.parent_id in by_id:
            children[exchange.parent_id].append(exchange)
        else:
            roots.append(exchange)
    paths: list[list[ExchangeFeedback]] = []
    for root in roots:
        # Depth first without recursion: a long chain of follow-ups must not overflow.
        stack: list[list[ExchangeFeedback]] = [[root]]
        while stack:
            path = stack.pop()
            following = children.get(path[-1].id, [])
            if not following:
                paths.append(path)
            stack.extend([*path, child] for child in reversed(following))
    return paths


def photo_conversations(
    paths: Sequence[Sequence[ExchangeFeedback]],
    judgements: Mapping[int, TurnJudgement],
    *,
    include_unrated: bool,
) -> PhotoConversations:
    """The candidate samples from the conversations about one photo (`conversation_paths`).

    Turns that no candidate carries get a fate: their own reason for not qualifying, or
    `Fate.AFTER_UNQUALIFIED_TURN` when they qualify but follow one that does not.
    """
    candidates: dict[tuple[int, ...], CandidateSample] = {}
    left_out: dict[int, Fate] = {}
    carried: set[int] = set()
    for path in paths:
        turns = _qualifying_start(path, judgements, include_unrated=include_unrated)
        if turns:
            candidate = CandidateSample(tuple(turns))
            candidates.setdefault(candidate.exchange_ids, candidate)
            carried.update(candidate.exchange_ids)
        for exchange in path[len(turns) :]:
            own = judgements[exchange.id].fate
            left_out.setdefault(exchange.id, own or Fate.AFTER_UNQUALIFIED_TURN)
    for exchange_id in carried:
        left_out.pop(exchange_id, None)
    return PhotoConversations(tuple(candidates.values()), left_out)


def _qualifying_start(
    path: Sequence[ExchangeFeedback],
    judgements: Mapping[int, TurnJudgement],
    *,
    include_unrated: bool,
) -> list[Turn]:
    """The longest start of ``path`` in which every turn qualifies, ending on a rated turn."""
    turns: list[Turn] = []
    for exchange in path:
        judgement = judgements[exchange.id]
        usable_context = include_unrated and judgement.fate is Fate.UNRATED
        if judgement.fate is not None and not usable_context:
            break
        assert judgement.target is not None
        question = clean_turn_text(exchange.question)
        turns.append(Turn(exchange, question, judgement.target, judgement))
    while turns and turns[-1].judgement.evidence is Evidence.UNRATED:
        turns.pop()
    return turns
