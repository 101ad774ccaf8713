"""The batcher, driven directly: per-person order across endpoints, coalescing, give-back."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.forward.batcher import Batch, Batcher, Entry
from gateway.rules.mappings import EMAIL, Mapped
from gateway.spool.sqlite import Pending

PEOPLE = ("p", "q", "r", "s")


def entry(row_id: int, person: str, *, delete: bool, identity: str = "external_id") -> Entry:
    """One mapped row: a deletion, or an opt-in dated by its row id."""
    row = Pending(row_id, 1000.0 + row_id, "user.deleted" if delete else "event.created", b"{}")
    changes = {} if delete else {EMAIL: "opted_in"}
    mapped = Mapped(identity, person, changes, float(row_id), delete=delete, erasure=delete)  # type: ignore[arg-type]
    return Entry(row, mapped)


def test_a_deletion_opening_the_batch_does_not_let_a_later_deletion_pass_an_update() -> None:
    """Backlog [Q delete, P update, P delete]: P's deletion waits for P's update to be sent."""
    batcher = Batcher()
    batcher.add(
        [entry(1, "q", delete=True), entry(2, "p", delete=False), entry(3, "p", delete=True)]
    )
    first = batcher.take(75)
    assert first is not None
    assert [(i.person, i.delete) for i in first.items] == [("q", True)]
    batcher.release(first)
    second = batcher.take(75)
    assert second is not None
    assert [(i.person, i.delete) for i in second.items] == [("p", False)]
    batcher.release(second)
    third = batcher.take(75)
    assert third is not None
    assert [(i.person, i.delete) for i in third.items] == [("p", True)]
    assert batcher.take(75) is None


def test_deletions_by_email_and_by_external_id_never_share_a_request() -> None:
    """Braze's /users/delete takes one identifier kind per request."""
    batcher = Batcher()
    batcher.add(
        [
            entry(1, "a@example.com", delete=True, identity="email"),
            entry(2, "ext-1", delete=True),
            entry(3, "b@example.com", delete=True, identity="email"),
        ]
    )
    first = batcher.take(75)
    assert first is not None
    assert [i.person for i in first.items] == ["a@example.com", "b@example.com"]
    second = batcher.take(75)
    assert second is not None
    assert [i.person for i in second.items] == ["ext-1"]


def test_give_back_returns_unsettled_rows_in_spool_order_and_frees_the_people() -> None:
    """A failed batch's rows come back where they were; settled items do not come back."""
    batcher = Batcher()
    batcher.add([entry(1, "p", delete=False), entry(2, "q", delete=False)])
    batch = batcher.take(75)
    assert batch is not None
    batcher.add([entry(3, "p", delete=False), entry(4, "r", delete=False)])
    batch.items[1].settled = True  # q was acknowledged before the failure
    assert batcher.give_back(batch) == 1
    batcher.release(batch)
    again = batcher.take(75)
    assert again is not None
    assert [(i.person, [r.id for r in i.rows]) for i in again.items] == [("p", [1, 3]), ("r", [4])]


@dataclass
class Plan:
    kinds: list[tuple[str, bool]]  # (person, delete) per spool row, in spool order
    seed: int
    size: int
    in_flight: int


plans = st.builds(
    Plan,
    kinds=st.lists(st.tuples(st.sampled_from(PEOPLE), st.booleans()), min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
    size=st.integers(1, 4),
    in_flight=st.integers(1, 4),
)


@settings(max_examples=300, deadline=None)
@given(plans)
def test_every_row_is_sent_once_and_each_persons_requests_keep_spool_order(plan: Plan) -> None:
    """Over random mixes of deletions and updates, rows arriving in pages, batches finishing in
    any order and some failing (given back): every row is sent exactly once, per person in
    spool order, no request mixes a deletion and an update, and nobody is in two requests."""
    rng = random.Random(plan.seed)
    batcher = Batcher()
    rows = [entry(n + 1, person, delete=d) for n, (person, d) in enumerate(plan.kinds)]
    unfetched = list(rows)
    flying: list[Batch] = []
    sent: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not unfetched and not batcher and not flying:
            break
        move = rng.random()
        if unfetched and move < 0.3:
            n = rng.randint(1, 5)
            batcher.add(unfetched[:n])
            unfetched = unfetched[n:]
        elif len(flying) < plan.in_flight and move < 0.65:
            batch = batcher.take(plan.size, delete_size=plan.size)
            if batch is None:
                continue
            assert len({item.delete for item in batch.items}) == 1
            for item in batch.items:
                assert item.delete == batch.delete
                assert all(e.mapped.delete == item.delete for e in item.entries)
            keys = [item.key for item in batch.items]
            assert len(keys) == len(set(keys)) <= plan.size
            for other in flying:
                assert not set(keys) & set(other.keys), "a person in two requests at once"
            flying.append(batch)
        elif flying:
            batch = flying.pop(rng.randrange(len(flying)))
            if rng.random() < 0.2:
                batcher.give_back(batch)  # a failure between fetching and acknowledging
            else:
                for item in batch.items:
                    item.settled = True
                    sent.setdefault(item.person, []).extend(r.id for r in item.rows)
            batcher.release(batch)
    else:
        raise AssertionError("the batcher never drained")
    for person in PEOPLE:
        wanted = [e.row.id for e in rows if e.mapped.person == person]
        assert sent.get(person, []) == wanted


def test_rows_of_a_partition_no_longer_owned_are_never_taken() -> None:
    """Rows given back after their partition's lease ran out stay unsent (in the spool, for
    the replica that owns them now), and are forgotten here so a later read can add them."""
    batcher = Batcher()
    first, second = entry(1, "p", delete=False), entry(2, "q", delete=False)
    batcher.add([first, second])
    batch = batcher.take(75)
    assert batch is not None
    batcher.give_back(batch)
    batcher.release(batch)
    assert batcher.take(75, owned=frozenset({1})) is None  # both rows are of partition 0
    assert len(batcher) == 0
    assert batcher.ids == set()


def test_a_returned_deletion_keeps_the_persons_later_rows_behind_it() -> None:
    """An item given back in flight (its partition went to another replica) goes back ahead
    of the person's later rows: forgotten with them while the partition is not owned, sent
    first once it is; a later opt-in never overtakes an earlier deletion."""
    batcher = Batcher()
    batcher.add([entry(1, "p", delete=True)])
    batch = batcher.take(75)
    assert batch is not None
    assert batch.delete
    batcher.add([entry(2, "p", delete=False)])  # fetched while the deletion was in flight
    batcher.give_back(batch)
    batcher.give_back(batch)  # a later failure of the same batch returns nothing twice
    batcher.release(batch)
    assert len(batcher) == 2
    first = batcher.take(75)
    assert first is not None
    assert first.delete  # the deletion first, the update after it
    assert [e.row.id for i in first.items for e in i.entries] == [1]
    batcher.release(first)


def test_a_returned_item_is_forgotten_with_the_later_rows_of_an_unowned_partition() -> None:
    """Not owned any more: the returned item and the person's later rows all go (they stay
    in the spool for the replica that owns them now), and their ids are freed for a re-read."""
    batcher = Batcher()
    batcher.add([entry(1, "p", delete=True)])
    batch = batcher.take(75)
    assert batch is not None
    batcher.add([entry(2, "p", delete=False)])
    batcher.give_back(batch)
    batcher.release(batch)
    assert batcher.take(75, owned=frozenset({5})) is None
    assert (len(batcher), batcher.ids) == (0, set())


def test_waiting_finds_an_earlier_row_appended_after_later_ones() -> None:
    """A backfill page (lower ids) appended after live rows, or rows read again after a
    partition move, still count as waiting before a later id: the backlog is not in id order."""
    batcher = Batcher()
    batcher.add([entry(100, "p", delete=False), entry(101, "q", delete=False)])
    batcher.add([entry(40, "r", delete=False), entry(120, "s", delete=False)])
    assert sorted(e.row.id for e in batcher.waiting(110)) == [40, 100, 101]
    assert [e.mapped.person for e in batcher.waiting(90)] == ["r"]


def full_scan(
    backlog: list[Entry], in_flight: set[str], size: int, delete_size: int, owned: set[int] | None
) -> tuple[list[tuple[str, list[int]]], list[int]]:
    """What `take` did before it stopped early: every backlog row visited. Returns the batch
    (person, row ids) and the row ids left in the backlog, in order."""
    items: dict[str, list[int]] = {}
    deletes: dict[str, bool] = {}
    kept: list[int] = []
    held: set[str] = set()
    kind: tuple[bool, str] | None = None
    for e in backlog:
        key, mapped = e.key, e.mapped
        if owned is not None and e.row.part not in owned:
            continue
        ok = False
        if key in held:
            ok = False
        elif key not in items:
            limit = delete_size if kind is not None and kind[0] else size
            wanted = (mapped.delete, mapped.identity if mapped.delete else "")
            if key not in in_flight and len(items) < limit and kind in (None, wanted):
                kind, ok = wanted, True
                items[key], deletes[key] = [], mapped.delete
        else:
            ok = deletes[key] == mapped.delete
        if not ok:
            held.add(key)
            kept.append(e.row.id)
            continue
        items[key].append(e.row.id)
    return [(key.partition(":")[2], ids) for key, ids in items.items()], kept


@dataclass
class Backlog:
    rows: list[tuple[str, bool, int]]  # (person, delete, partition) per row, in spool order
    in_flight: set[str]
    size: int
    owned: set[int] | None


backlogs = st.builds(
    Backlog,
    rows=st.lists(
        st.tuples(
            st.sampled_from(("p", "q", "r", "s", "t", "u")), st.booleans(), st.integers(0, 2)
        ),
        max_size=30,
    ),
    in_flight=st.sets(st.sampled_from(("external_id:p", "external_id:t"))),
    size=st.integers(1, 3),
    owned=st.none() | st.sets(st.integers(0, 2)),
)


@settings(max_examples=500, deadline=None)
@given(backlogs)
def test_take_stopping_once_full_takes_what_a_full_scan_takes(plan: Backlog) -> None:
    """`take` stops reading the backlog once the batch is full and none of its people has a
    row further on; the batch, the rows left and their order are what a scan of every row
    gives, later rows of the batch's people still join it, and unowned rows are forgotten."""
    rows = []
    for n, (person, delete, part) in enumerate(plan.rows):
        e = entry(n + 1, person, delete=delete)
        rows.append(Entry(Pending(e.row.id, e.row.received_at, e.row.type, b"{}", part), e.mapped))
    batcher = Batcher()
    batcher.add(rows)
    batcher.in_flight.update(plan.in_flight)
    owned = frozenset(plan.owned) if plan.owned is not None else None
    wanted, left = full_scan(rows, plan.in_flight, plan.size, plan.size, plan.owned)
    batch = batcher.take(plan.size, delete_size=plan.size, owned=owned)
    got = [(i.person, [r.id for r in i.rows]) for i in batch.items] if batch else []
    assert got == wanted
    assert [e.row.id for e in batcher.waiting(10**9)] == left
    assert len(batcher) == len(left)
    assert batcher.people_waiting == len({rows[i - 1].key for i in left})
