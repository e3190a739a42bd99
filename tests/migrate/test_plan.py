"""Planning: every message decided before anything is written, the same on every run."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from popbox.migrate.plan import Decision, SourceMessage, plan_folder, uidl_problem


def sources(*uidls: str | None) -> list[SourceMessage]:
    return [SourceMessage(f"k{n}", None, uidl) for n, uidl in enumerate(uidls)]


def test_valid_unique_uidls_are_kept_in_order() -> None:
    plan = plan_folder("INBOX", sources("a", "b", "c"), copy=False)
    assert [(m.decision, m.uidl) for m in plan.messages] == [
        (Decision.KEEP, "a"),
        (Decision.KEEP, "b"),
        (Decision.KEEP, "c"),
    ]


def test_repeats_are_renamed_as_dovecot_does() -> None:
    plan = plan_folder("INBOX", sources("a", "a", "a"), copy=False)
    assert [m.uidl for m in plan.messages] == ["a", "a-2", "a-3"]
    assert [m.decision for m in plan.messages][1:] == [Decision.REWRITE] * 2


def test_a_rename_never_takes_a_uidl_a_later_message_really_had() -> None:
    plan = plan_folder("INBOX", sources("a", "a", "a-2"), copy=False)
    assert [m.uidl for m in plan.messages] == ["a", "a-3", "a-2"]
    assert plan.messages[2].decision is Decision.KEEP


def test_invalid_uidls_are_rewritten_stably() -> None:
    too_long = "x" * 71
    plan = plan_folder("INBOX", sources(too_long, "has space", ""), copy=False)
    assert all(m.decision is Decision.REWRITE for m in plan.messages)
    assert all(uidl_problem(m.uidl or "") is None for m in plan.messages)
    again = plan_folder("INBOX", sources(too_long, "has space", ""), copy=False)
    assert [m.uidl for m in again.messages] == [m.uidl for m in plan.messages]
    assert "71 characters" in plan.messages[0].reason


def test_new_messages_get_popbox_uidls_in_place_and_stable_ones_when_copied() -> None:
    in_place = plan_folder("INBOX", sources(None, "a"), copy=False)
    assert in_place.messages[0].decision is Decision.NEW
    assert in_place.messages[0].uidl is None
    copied = plan_folder("INBOX", sources(None, "a"), copy=True)
    assert copied.messages[0].uidl is not None
    assert (
        copied.messages[0].uidl == plan_folder("INBOX", sources(None), copy=True).messages[0].uidl
    )


uidl_text = st.one_of(st.none(), st.text(max_size=80), st.sampled_from(["a", "a-2", "b"]))


@given(st.lists(uidl_text, max_size=30), st.booleans())
def test_every_plan_serves_valid_unique_uidls_and_keeps_what_it_can(
    uidls: list[str | None], copy: bool
) -> None:
    plan = plan_folder("INBOX", sources(*uidls), copy=copy)
    served = [m.uidl for m in plan.messages if m.uidl is not None]
    assert len(served) == len(set(served))
    assert all(uidl_problem(uidl) is None for uidl in served)
    seen: set[str] = set()
    for source, planned in zip(sources(*uidls), plan.messages, strict=True):
        old = source.old_uidl
        if old is not None and uidl_problem(old) is None and old not in seen:
            assert planned.decision is Decision.KEEP
            assert planned.uidl == old
        if old is not None:
            seen.add(old)
    assert plan_folder("INBOX", sources(*uidls), copy=copy) == plan
