"""spool.known: a lane page's applied times read ahead, dropped by any ack that may write them."""

from __future__ import annotations

from gateway.spool.known import Known

AT = {("p", "t"): 5.0}


def test_an_ack_after_the_read_drops_the_person() -> None:
    """An ack that starts once the read-ahead is kept drops that person, and only that one."""
    known = Known()
    with known.reading():
        known.keep({"p", "q"}, AT)
    with known.writing({"p"}):
        assert known.take("p") is None
    assert known.take("q") == {}
    assert known.take("q") is None  # taken once


def test_an_ack_in_progress_or_finished_during_the_read_is_not_trusted() -> None:
    """A person whose ack was in progress when the read ran, or ended while it ran, is read
    afresh: the read may or may not have seen that commit."""
    known = Known()
    with known.writing({"busy"}), known.reading():
        with known.writing({"done"}):
            pass
        known.keep({"busy", "done", "calm"}, AT)
    assert known.take("busy") is None
    assert known.take("done") is None
    assert known.take("calm") == {}


def test_an_ack_finished_before_the_read_is_seen_by_it() -> None:
    """An ack that ended before the read began committed first: the read's times are kept."""
    known = Known()
    with known.writing({"p"}):
        pass
    with known.reading():
        known.keep({"p"}, AT)
    assert known.take("p") == AT
