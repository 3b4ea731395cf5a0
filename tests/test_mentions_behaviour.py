"""Unit tests of the mentions behaviour, its payload model and feed, and the probe behaviour."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from agents.mentions import Decision, Mention, MentionFeed, decide, handle
from fleetworks.proving import probe

#: A mention that every rule of ``decide`` ignores; tests override one field at a time.
NEUTRAL: dict[str, Any] = {
    "mention_id": "m-1",
    "brand": "acme",
    "author": "user001",
    "text": "saw an acme billboard today",
    "sentiment": 0.0,
    "followers": 10,
}


def make(**overrides: Any) -> Mention:
    """A valid mention: ``NEUTRAL`` with ``overrides`` applied."""
    return Mention(**{**NEUTRAL, **overrides})


@dataclass
class RecordingSink:
    """An in-memory MentionSink that keeps every call in order."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def processing(self, mention: Mention, fencing_token: int) -> None:
        self.calls.append(("processing", mention.mention_id, fencing_token))

    def respond(self, mention: Mention, text: str, fencing_token: int) -> None:
        self.calls.append(("respond", mention.mention_id, text, fencing_token))

    def ignore(self, mention: Mention, reason: str, fencing_token: int) -> None:
        self.calls.append(("ignore", mention.mention_id, reason, fencing_token))


@dataclass
class RecordingProbeSink:
    """An in-memory ProbeSink that keeps every recorded effect."""

    records: list[tuple[str, int]] = field(default_factory=list)

    def record(self, effect_key: str, fencing_token: int, *, unique: bool = True) -> None:
        self.records.append((effect_key, fencing_token))


# --- decide -------------------------------------------------------------------


def test_neutral_mention_is_ignored_as_chatter() -> None:
    """A mention matching no rule is ignored as neutral chatter."""
    assert decide(make()) == Decision("ignore", "neutral chatter")


@pytest.mark.parametrize("scheme", ["http://", "https://", "HTTPS://"])
def test_link_is_ignored_even_when_another_rule_would_respond(scheme: str) -> None:
    """A link wins over a question, a complaint and loud praise: it is spam."""
    # Given a mention that is a question, negative and from a large account
    mention = make(text=f"is this real? {scheme}spam.example", sentiment=-0.9, followers=50_000)
    # When / Then: the link rule comes first
    assert decide(mention) == Decision("ignore", "contains a link: likely spam")


def test_own_account_is_ignored_case_insensitively() -> None:
    """A mention written by the brand's own account is ignored, whatever its content."""
    mention = make(author="ACME", brand="Acme", text="any questions?", sentiment=-1.0)
    assert decide(mention) == Decision("ignore", "our own account")


def test_question_gets_a_response_addressed_to_the_author() -> None:
    """A question mark means a response naming the author and the brand."""
    decision = decide(make(text="does acme ship to Canada?", author="user042"))
    assert decision.action == "respond"
    assert decision.text.startswith("@user042 ")
    assert "acme" in decision.text


@pytest.mark.parametrize("sentiment", [-0.3, -0.31, -1.0])
def test_negative_sentiment_gets_a_response(sentiment: float) -> None:
    """Sentiment at or below -0.3 is a complaint and gets an apology."""
    decision = decide(make(sentiment=sentiment))
    assert decision.action == "respond"
    assert decision.text.startswith("@user001 sorry")


def test_mildly_negative_sentiment_is_ignored() -> None:
    """Just above the complaint threshold is still chatter."""
    assert decide(make(sentiment=-0.29)).action == "ignore"


@pytest.mark.parametrize(("sentiment", "followers"), [(0.5, 1000), (1.0, 10**9)])
def test_loud_praise_gets_a_thank_you(sentiment: float, followers: int) -> None:
    """Strong praise from an account with at least 1000 followers is thanked."""
    assert decide(make(sentiment=sentiment, followers=followers)) == Decision(
        "respond", "@user001 thank you, that means a lot!"
    )


@pytest.mark.parametrize(("sentiment", "followers"), [(0.49, 100_000), (1.0, 999)])
def test_quiet_or_mild_praise_is_ignored(sentiment: float, followers: int) -> None:
    """Praise needs both sentiment >= 0.5 and followers >= 1000 to be answered."""
    assert decide(make(sentiment=sentiment, followers=followers)).action == "ignore"


# --- handle -------------------------------------------------------------------


def test_handle_marks_processing_then_responds_with_the_fencing_token() -> None:
    """A mention to answer: processing, then one respond, both with the token."""
    sink = RecordingSink()
    mention = make(mention_id="m-q", text="how do I reset my acme password?")

    result = handle(mention, sink, fencing_token=7)

    assert result == {"mention_id": "m-q", "action": "respond"}
    assert sink.calls == [
        ("processing", "m-q", 7),
        ("respond", "m-q", decide(mention).text, 7),
    ]


def test_handle_marks_processing_then_ignores_with_the_fencing_token() -> None:
    """A mention to skip: processing, then one ignore with the reason, both with the token."""
    sink = RecordingSink()

    result = handle(make(mention_id="m-n"), sink, fencing_token=3)

    assert result == {"mention_id": "m-n", "action": "ignore"}
    assert sink.calls == [("processing", "m-n", 3), ("ignore", "m-n", "neutral chatter", 3)]


# --- Mention validation -------------------------------------------------------


@pytest.mark.parametrize(
    "mention_id",
    ["", "has space", "slash/id", "semi;colon", "emoji-\u2603", "x" * 101],
)
def test_mention_rejects_bad_ids(mention_id: str) -> None:
    """Ids must be 1-100 characters of letters, digits and ``._:-``."""
    with pytest.raises(ValidationError):
        make(mention_id=mention_id)


@pytest.mark.parametrize("mention_id", ["a", "m-1.2:3_x", "x" * 100])
def test_mention_accepts_good_ids(mention_id: str) -> None:
    """Ids at the edges of the allowed shape are accepted."""
    assert make(mention_id=mention_id).mention_id == mention_id


def test_mention_rejects_extra_fields() -> None:
    """An unknown field is an error, not silently dropped."""
    with pytest.raises(ValidationError, match="extra"):
        Mention.model_validate({**NEUTRAL, "retweets": 3})


@pytest.mark.parametrize("sentiment", [-1.0001, 1.0001, float("nan")])
def test_mention_rejects_out_of_range_sentiment(sentiment: float) -> None:
    """Sentiment must lie in [-1, 1]."""
    with pytest.raises(ValidationError):
        make(sentiment=sentiment)


def test_mention_accepts_sentiment_bounds() -> None:
    """-1 and 1 themselves are valid sentiments."""
    assert make(sentiment=-1.0).sentiment == -1.0
    assert make(sentiment=1.0).sentiment == 1.0


def test_mention_rejects_negative_followers() -> None:
    """A follower count cannot be negative."""
    with pytest.raises(ValidationError):
        make(followers=-1)


def test_mention_is_frozen() -> None:
    """A delivered mention cannot be altered."""
    mention = make()
    with pytest.raises(ValidationError):
        mention.text = "changed"


# --- MentionFeed --------------------------------------------------------------


def test_feed_window_is_deterministic_for_a_seed() -> None:
    """The same seed and slot give the same window on every poll and every feed."""
    assert MentionFeed(seed=11).window(4, 20) == MentionFeed(seed=11).window(4, 20)
    feed = MentionFeed(seed=11)
    assert feed.window(4, 20) == feed.window(4, 20)


def test_feed_windows_differ_between_seeds() -> None:
    """Two seeds give two different feeds."""
    first = MentionFeed(seed=1).window(2, 20)
    second = MentionFeed(seed=2).window(2, 20)
    assert [m.mention_id for m in first] != [m.mention_id for m in second]
    assert [m.model_dump(exclude={"mention_id"}) for m in first] != [
        m.model_dump(exclude={"mention_id"}) for m in second
    ]


@pytest.mark.parametrize(
    ("limit", "overlap"), [(20, 0.25), (10, 0.3), (7, 0.5), (5, 0.0), (9, 0.99)]
)
def test_window_repeats_the_head_of_the_previous_slot(limit: int, overlap: float) -> None:
    """A poll re-reports int(limit * overlap) mentions of slot - 1 before the slot's own."""
    feed = MentionFeed(seed=5, overlap=overlap)
    repeat = int(limit * overlap)

    window = feed.window(3, limit)

    assert len(window) == repeat + limit
    assert window[:repeat] == feed.fresh(2, limit)[:repeat]
    assert window[repeat:] == feed.fresh(3, limit)


def test_consecutive_windows_share_mentions() -> None:
    """Polling slot after slot delivers some mentions twice, as a real overlapping API does."""
    feed = MentionFeed(seed=8, overlap=0.25)
    ids = [m.mention_id for slot in range(4) for m in feed.window(slot, 20)]
    assert len(ids) - len(set(ids)) == 3 * 5


def test_first_window_has_no_repeats() -> None:
    """Slot 0 has no previous slot to repeat."""
    feed = MentionFeed(seed=5)
    assert feed.window(0, 10) == feed.fresh(0, 10)


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_feed_rejects_overlap_outside_unit_interval(overlap: float) -> None:
    """Overlap must lie in [0, 1)."""
    with pytest.raises(ValueError, match="overlap"):
        MentionFeed(seed=1, overlap=overlap)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_stream_delivers_every_mention_with_a_share_of_duplicates(seed: int) -> None:
    """Every distinct mention arrives at least once, and 15-35 % extra deliveries at rate 0.25."""
    count = 1000

    delivered = list(MentionFeed(seed=seed).stream(count, 0.25))

    per_id = Counter(m.mention_id for m in delivered)
    assert set(per_id) == {f"d-{seed}-{i}" for i in range(count)}
    extra = len(delivered) - count
    assert 0.15 * count <= extra <= 0.35 * count
    # A repeat is the same mention, not a new one under the same id.
    first_seen: dict[str, Mention] = {}
    for m in delivered:
        assert first_seen.setdefault(m.mention_id, m) == m


def test_stream_without_duplicates_delivers_each_mention_once_in_order() -> None:
    """With rate 0 the stream is exactly the ``count`` mentions, in id order."""
    delivered = list(MentionFeed(seed=3).stream(50, 0.0, prefix="p"))
    assert [m.mention_id for m in delivered] == [f"p-3-{i}" for i in range(50)]


def test_stream_is_deterministic_for_a_seed() -> None:
    """The same seed yields the same stream, duplicates included."""
    assert list(MentionFeed(seed=9).stream(200, 0.25)) == list(
        MentionFeed(seed=9).stream(200, 0.25)
    )


# --- decide, property ---------------------------------------------------------

mentions = st.builds(
    Mention,
    mention_id=st.from_regex(r"[A-Za-z0-9._:-]{1,100}", fullmatch=True),
    brand=st.text(min_size=1, max_size=100),
    author=st.text(min_size=1, max_size=100),
    text=st.text(max_size=2000),
    sentiment=st.floats(min_value=-1.0, max_value=1.0, allow_nan=False),
    followers=st.integers(min_value=0, max_value=10**12),
)


@given(mention=mentions)
def test_decide_always_returns_respond_or_ignore(mention: Mention) -> None:
    """For any valid mention, decide returns a decision with a non-empty text and never raises."""
    decision = decide(mention)
    assert decision.action in ("respond", "ignore")
    assert decision.text


@given(mention=mentions)
def test_handle_always_makes_exactly_one_decision_write(mention: Mention) -> None:
    """For any valid mention, handle writes processing then exactly one of respond/ignore."""
    sink = RecordingSink()
    result = handle(mention, sink, fencing_token=1)
    assert [call[0] for call in sink.calls] == ["processing", result["action"]]


# --- probe --------------------------------------------------------------------


def test_probe_sleeps_for_its_work_then_records_its_effect() -> None:
    """A probe with work sleeps work_ms / 1000 s once, then records its id with the token."""
    sink = RecordingProbeSink()
    slept: list[float] = []

    result = probe.run(probe.Probe(id="p-1", work_ms=250), sink, 9, sleep=slept.append)

    assert result == {"id": "p-1"}
    assert slept == [0.25]
    assert sink.records == [("p-1", 9)]


def test_probe_without_work_does_not_sleep() -> None:
    """work_ms = 0 means no sleep call at all."""
    sink = RecordingProbeSink()
    slept: list[float] = []

    probe.run(probe.Probe(id="p-2"), sink, 1, sleep=slept.append)

    assert slept == []
    assert sink.records == [("p-2", 1)]


def test_probe_without_effect_records_nothing() -> None:
    """effect=False is a no-op task: it still returns its id."""
    sink = RecordingProbeSink()
    slept: list[float] = []

    result = probe.run(probe.Probe(id="p-3", work_ms=10, effect=False), sink, 1, sleep=slept.append)

    assert result == {"id": "p-3"}
    assert slept == [0.01]
    assert sink.records == []


@pytest.mark.parametrize(
    "fields",
    [{"id": ""}, {"id": "p", "work_ms": -1}, {"id": "p", "work_ms": 600_001}, {"id": "p", "x": 1}],
)
def test_probe_payload_validation(fields: dict[str, Any]) -> None:
    """Empty ids, out-of-range work and unknown fields are rejected."""
    with pytest.raises(ValidationError):
        probe.Probe(**fields)
