"""The DNS name table (weft.dns.table, names, wire) as pure data: names in one form, a merge that is a join, purge,
the correction of stale entries, and the ``dns`` payload's encoding and total decoding."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.dns import names
from weft.dns.table import MAX_ENTRIES, MAX_VERSION, PURGE_AGE, Entry, Table, join, next_version, wins
from weft.dns.wire import MAX_KEY, DnsUpdate
from weft.mesh.codec import MAX_MESSAGE, DecodeError, pack

ME = 99  # the table's own peer: no generated entry names it, unless a test says so
WEB = "web.weft.local."

# -- names -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_name", "domain", "expected"),
    [
        ("web", "weft.local.", "web.weft.local."),
        ("WEB", "weft.local.", "web.weft.local."),
        ("  web\n", "weft.local.", "web.weft.local."),
        ("web.weft.local", "weft.local.", "web.weft.local."),
        ("Web.Weft.Local.", "weft.local.", "web.weft.local."),
        ("web.example.com", "weft.local.", "web.example.com."),
        ("db_1", "weft.local.", "db_1.weft.local."),
        ("a-b", "weft.local.", "a-b.weft.local."),
        ("web", "Example.COM", "web.example.com."),
        ("web", "corp.", "web.corp."),
        ("x" * 63, "weft.local.", "x" * 63 + ".weft.local."),
        ("a." * 126 + "b", "weft.local.", "a." * 126 + "b."),  # 253 characters, the most
    ],
)
def test_a_name_has_one_normal_form(given_name: str, domain: str, expected: str) -> None:
    assert names.normalise(given_name, domain) == expected
    assert names.check(expected) == expected
    assert names.normalise(expected, domain) == expected  # normal form is a fixed point


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("", "empty"),
        (".", "empty"),
        ("   ", "empty"),
        ("a..b", "empty label"),
        (".web", "empty label"),
        ("web..", "empty label"),
        ("we b", "character ' '"),
        ("wéb", "character 'é'"),
        ("web!", "character '!'"),
        ("web/1", "character '/'"),
        ("x" * 64, "label of 64 characters"),
        ("a." * 126 + "bc", "254 characters"),
        (5, "must be text"),
    ],
)
def test_an_invalid_name_is_a_value_error_saying_what_is_wrong(bad: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        names.normalise(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("not_normal", ["web", "Web.weft.local.", "web.weft.local", "", "."])
def test_a_name_from_the_wire_must_already_be_in_normal_form(not_normal: str) -> None:
    with pytest.raises(ValueError):
        names.check(not_normal)


def test_domains_and_what_lies_in_them() -> None:
    assert names.domain_of("weft.local") == names.DEFAULT_DOMAIN == "weft.local."
    assert names.domain_of(" Corp.Example ") == "corp.example."
    for bad in ("", ".", "a..b"):
        with pytest.raises(ValueError):
            names.domain_of(bad)
    assert names.in_domain("web.weft.local.", "weft.local.")
    assert names.in_domain("a.b.weft.local.", "weft.local.")
    assert not names.in_domain("weft.local.", "weft.local.")
    assert not names.in_domain("webweft.local.", "weft.local.")
    assert not names.in_domain("web.example.com.", "weft.local.")


# -- the merge is a join -------------------------------------------------------------------------------------------

# A small space of identities and versions, so that the same identity meets itself at equal versions often.
entry_strategy = st.builds(
    Entry,
    st.sampled_from(["a.weft.local.", "b.weft.local."]),
    st.sampled_from([1, 2]),
    st.sampled_from(["netns:x", "netns:y"]),
    st.sampled_from([11, 22]),
    st.integers(1, 3),
    st.one_of(st.none(), st.sampled_from([-5.0, 0.0, 2.5, 7.0])),
)
entries_strategy = st.lists(entry_strategy, max_size=12)


def replica(entries: list[Entry]) -> Table:
    table = Table(ME)
    for entry in entries:
        table.merge(entry)
    return table


def merged(*tables: Table) -> Table:
    out = Table(ME)
    for table in tables:
        for entry in table.entries():
            out.merge(entry)
    return out


def contents(table: Table) -> dict:
    return {e.identity: e for e in table.entries()}


@given(entries_strategy, entries_strategy)
def test_merge_is_commutative(a: list[Entry], b: list[Entry]) -> None:
    assert contents(merged(replica(a), replica(b))) == contents(merged(replica(b), replica(a)))


@given(entries_strategy, entries_strategy, entries_strategy)
def test_merge_is_associative(a: list[Entry], b: list[Entry], c: list[Entry]) -> None:
    ra, rb, rc = replica(a), replica(b), replica(c)
    assert contents(merged(merged(ra, rb), rc)) == contents(merged(ra, merged(rb, rc)))


@given(entries_strategy)
def test_merge_is_idempotent_and_a_repeat_is_no_news(a: list[Entry]) -> None:
    table = replica(a)
    before = contents(table)
    assert [table.merge(e) for e in a] == [None] * len(a)
    assert contents(merged(table, table)) == before == contents(table)


@given(entries_strategy)
def test_the_order_entries_arrive_in_does_not_matter(a: list[Entry]) -> None:
    assert contents(replica(a)) == contents(replica(list(reversed(a))))


@given(entries_strategy, entries_strategy)
def test_pending_gossip_merges_as_the_table_does(a: list[Entry], b: list[Entry]) -> None:
    pending = DnsUpdate()
    for part in (a, b):
        update = DnsUpdate()
        for e in part:
            update.merge(DnsUpdate({e.identity: e}))
        pending.merge(update)
    assert pending.entries == contents(replica(a + b))


def test_ties_a_tombstone_wins_and_two_removals_keep_the_older_time() -> None:
    live = Entry(WEB, 1, "k", 11, 5)
    dead = Entry(WEB, 1, "k", 11, 5, tombstone=3.0)
    older = Entry(WEB, 1, "k", 11, 5, tombstone=1.0)
    assert join(live, dead) == join(dead, live) == dead
    assert join(dead, older) == join(older, dead) == older
    assert wins(Entry(WEB, 1, "k", 11, 6), dead)  # a higher version brings it back


# -- answers ---------------------------------------------------------------------------------------------------------


def test_lookup_answers_live_entries_of_origins_in_the_topology_only() -> None:
    table = replica(
        [
            Entry(WEB, 5, "netns:a", 11, 1),
            Entry(WEB, 3, "netns:b", 22, 1),
            Entry(WEB, 3, "netns:c", 11, 1),  # the same address twice: answered once
            Entry(WEB, 7, "netns:d", 33, 1),
            Entry(WEB, 9, "netns:e", 11, 2, tombstone=1.0),
            Entry("db.weft.local.", 5, "netns:a", 11, 1),
        ]
    )
    assert table.lookup(WEB, {11, 22, 33}) == [3, 5, 7]
    assert table.lookup(WEB, {11}) == [3, 5]
    assert table.lookup(WEB, set()) == []
    assert table.lookup("nothing.weft.local.", {11}) == []
    assert table.reverse(5, {11, 22}) == ["db.weft.local.", WEB]
    assert table.reverse(9, {11}) == []  # removed
    assert table.reverse(7, {11}) == []  # origin gone
    assert table.shown({11, 22, 33}) == 5
    assert table.shown({22}) == 1


# -- purge -----------------------------------------------------------------------------------------------------------


def test_purge_drops_tombstones_of_the_purge_age_and_keeps_the_rest() -> None:
    table = replica(
        [
            Entry(WEB, 1, "k", 11, 2, tombstone=100.0),
            Entry(WEB, 2, "k", 11, 2, tombstone=100.0 + PURGE_AGE / 2),
            Entry(WEB, 3, "k", 11, 2),
        ]
    )
    table.track({11}, 0.0)
    assert table.purge(100.0 + PURGE_AGE - 0.001) == []
    dropped = table.purge(100.0 + PURGE_AGE)
    assert [e.address for e in dropped] == [1]
    assert sorted(e.address for e in table.entries()) == [2, 3]
    assert [e.address for e in table.purge(1e9)] == [2]
    assert table.lookup(WEB, {11}) == [3]  # live entries are never purged while their origin is there


def test_entries_of_an_origin_absent_for_the_purge_age_are_dropped_unless_it_came_back() -> None:
    table = replica([Entry(WEB, 1, "k", 11, 1), Entry(WEB, 2, "k", 22, 1), Entry(WEB, 3, "k", 33, 1)])
    table.track({11, 22, 33}, 0.0)
    table.track({11}, 10.0)  # 22 and 33 leave
    assert table.lookup(WEB, {11}) == [1]
    assert len(table) == 3  # hidden, kept
    table.track({11, 22}, 20.0)  # 22 comes back: its entries are answered again, its absence forgotten
    assert table.lookup(WEB, {11, 22}) == [1, 2]
    table.track({11}, 30.0)  # and leaves again
    assert table.purge(10.0 + PURGE_AGE) == [Entry(WEB, 3, "k", 33, 1)]
    assert table.absent_since(33) is None
    assert [e.address for e in table.purge(30.0 + PURGE_AGE)] == [2]
    assert [e.address for e in table.entries()] == [1]


# -- versions and the origin's word ----------------------------------------------------------------------------------


def test_versions_are_the_wall_clock_unless_that_would_not_beat_the_last() -> None:
    assert next_version(0, 1_700_000_000_000) == 1_700_000_000_000
    assert next_version(1_700_000_000_000, 1_700_000_000_000) == 1_700_000_000_001  # twice in a millisecond
    assert next_version(1_800_000_000_000, 1_700_000_000_000) == 1_800_000_000_001  # the clock went back
    assert next_version(MAX_VERSION, 5) == MAX_VERSION
    table = Table(ME)
    first = table.add("netns:a", WEB, 1, wall_ms=1000)
    assert first is not None and first.version == 1000
    assert table.add("netns:a", WEB, 1, wall_ms=2000) is None  # already live
    gone = table.remove(first.identity, wall_ms=1000, now=5.0)
    assert gone is not None and gone.version == 1001 and gone.tombstone == 5.0
    assert table.remove(first.identity, wall_ms=3000, now=6.0) is None
    again = table.add("netns:a", WEB, 1, wall_ms=900)
    assert again is not None and again.version == 1002 and again.live


def test_a_restarted_run_without_state_beats_the_last_run_by_the_clock() -> None:
    before = Table(ME)
    old = before.add("netns:a", WEB, 1, wall_ms=1_700_000_000_000)
    for i in range(5):  # a burst: versions run ahead of the clock by a few
        before.remove(old.identity, 1_700_000_000_000, float(i))  # type: ignore[union-attr]
        old = before.add("netns:a", WEB, 1, wall_ms=1_700_000_000_000)
    after = Table(ME)  # the next run, a second later, knows nothing
    new = after.add("netns:a", WEB, 1, wall_ms=1_700_000_001_000)
    assert old is not None and new is not None
    assert wins(new, old)


@given(
    st.builds(
        Entry,
        st.just(WEB),
        st.just(1),
        st.just("netns:a"),
        st.just(ME),
        st.integers(1, MAX_VERSION - 1),
        st.one_of(st.none(), st.just(1.0)),
    ),
    st.sampled_from(["nothing", "live", "removed"]),
    st.integers(0, 1 << 45),
)
@settings(max_examples=300)
def test_an_entry_naming_us_that_we_contradict_is_answered_by_one_that_beats_it(
    theirs: Entry, ours: str, wall_ms: int
) -> None:
    """Whatever a peer says of our entry, and whatever we hold: either we say the same already, or our answer wins
    over it, so the peer that merges the answer says what we say."""
    table = Table(ME)
    if ours != "nothing":
        mine = table.add(theirs.key, theirs.name, theirs.address, wall_ms=max(1, wall_ms))
        if ours == "removed":
            table.remove(mine.identity, wall_ms, 0.0)  # type: ignore[union-attr]
    held = table.get(theirs.identity)
    contradicted = table.contradicts(theirs)
    answer = table.answer(theirs, wall_ms, now=50.0)
    if not contradicted:
        assert answer is None
        return
    assert answer is not None
    assert wins(answer, theirs)
    assert answer.live == (held is not None and held.live)  # ours again, or a tombstone when we hold nothing
    assert table.get(theirs.identity) == answer
    assert not table.contradicts(theirs)  # said once: the same entry again is no news


def test_a_stale_entry_of_ours_comes_back_as_a_tombstone_that_hides_it_everywhere() -> None:
    """215_stale_dns: our tombstone was purged everywhere, but a peer that missed it still holds the live entry and
    sends it to us. We answer with a tombstone of a higher version; a peer holding the stale entry takes it."""
    stale = Entry(WEB, 1, "netns:a", ME, 1_700_000_000_000)
    other = Table(11)
    other.merge(stale)
    assert other.lookup(WEB, {ME, 11}) == [1]
    us = Table(ME)
    assert us.contradicts(stale)
    answer = us.answer(stale, wall_ms=1_700_000_000_000 - 5000, now=7.0)  # even with our clock behind
    assert answer is not None and not answer.live and answer.version == stale.version + 1
    assert other.merge(answer) == answer
    assert other.lookup(WEB, {ME, 11}) == []
    assert other.merge(stale) is None  # the stale copy, sent again by a third peer, changes nothing


def test_an_entry_naming_us_at_the_highest_version_cannot_be_outdone_but_a_live_one_is_still_put_down() -> None:
    table = Table(ME)
    mine = table.add("netns:a", WEB, 1, wall_ms=5)
    assert mine is not None
    forged_dead = Entry(WEB, 1, "netns:a", ME, MAX_VERSION, tombstone=0.0)
    assert table.contradicts(forged_dead)
    assert table.answer(forged_dead, 5, 0.0) is None
    forged_live = Entry(WEB, 2, "netns:a", ME, MAX_VERSION)
    answer = table.answer(forged_live, 5, 0.0)
    assert answer is not None and not answer.live and answer.version == MAX_VERSION
    assert wins(answer, forged_live)


# -- the wire ----------------------------------------------------------------------------------------------------------


def test_an_update_decodes_to_what_was_encoded_with_ages_instead_of_times() -> None:
    sent = [
        Entry(WEB, 0x0A200001, "netns:a", 11, 1_700_000_000_000),
        Entry(WEB, 0x0A200002, "netns:b", 11, 1_700_000_000_001, tombstone=90.0),
        Entry("db.weft.local.", 0x0A200001, "netns:a", 22, 3, tombstone=99.5),
    ]
    update = DnsUpdate.of(sent, 11, clock=lambda: 100.0)  # the sender's clock: removed 10 s and 0.5 s ago
    got = DnsUpdate.decode(update.encode(), now=5000.0)  # the receiver's clock
    assert got.sender == 11
    assert {e.identity: e.tombstone for e in got.entries.values()} == {
        sent[0].identity: None,
        sent[1].identity: pytest.approx(4990.0),
        sent[2].identity: pytest.approx(4999.5),
    }
    assert [(e.name, e.address, e.key, e.origin, e.version) for e in sorted(got.entries.values(), key=str)] == [
        (e.name, e.address, e.key, e.origin, e.version) for e in sorted(sent, key=str)
    ]


def test_each_name_and_key_is_sent_once_per_message() -> None:
    many = [Entry(WEB, a, "netns:a-long-container-key", 11, 1) for a in range(1, 101)]
    one = DnsUpdate.of(many[:1], 11, clock=lambda: 0.0).encode()
    hundred = DnsUpdate.of(many, 11, clock=lambda: 0.0).encode()
    assert len(hundred) - len(one) < 99 * 12  # an address and a version per more entry, not the strings again


def test_a_full_table_at_its_largest_fits_one_message() -> None:
    """MAX_ENTRIES entries with the longest names and keys: every full state a peer sends must decode elsewhere."""
    longest = ("x" * 63 + ".") * 3 + "y" * 61 + "."
    assert len(longest) == 254
    entries = [
        Entry(f"{i:08d}{longest[8:]}", i, f"{i:08d}" + "k" * (MAX_KEY - 8), 1 + i % 1000, (1 << 62) + i, 1.0)
        for i in range(MAX_ENTRIES)
    ]
    payload = DnsUpdate.of(entries, 1, clock=lambda: 1e9).encode()
    assert len(payload) < MAX_MESSAGE
    assert len(DnsUpdate.decode(payload, 0.0).entries) == MAX_ENTRIES


def body(**overrides: object) -> dict:
    raw: dict = {"f": 11, "o": [[11, [[WEB, 5, "netns:a", 7, 0]]]]}
    raw.update(overrides)
    return raw


def entry(*fields: object) -> dict:
    """A body whose one entry is ``fields``."""
    return body(o=[[11, [list(fields)]]])


@pytest.mark.parametrize(
    "raw",
    [
        [],
        7,
        {"o": []},  # no sender
        body(f=0),
        body(f=1 << 48),
        body(o={}),
        body(o=[[11, [[WEB, 5, "netns:a", 7, 0]] + [[0, a, 1, 7, 0] for a in range(6, MAX_ENTRIES + 6)]]]),
        body(o=[[11, [[WEB, a, "k", 7, 0]]] for a in range(MAX_ENTRIES + 1)]),  # too many groups
        body(o=[[11]]),
        body(o=[[11, []]]),
        body(o=[[0, [[WEB, 5, "k", 7, 0]]]]),
        body(o=[[11, [[WEB, 5, "k", 7, 0]]], [11, [[0, 6, 1, 7, 0]]]]),  # an origin twice
        body(o=[[11, [[WEB, 5, "k", 7, 0], [0, 5, 1, 8, 0]]]]),  # an entry twice
        entry(WEB, 5, "k", 7),
        entry(WEB, 5, "k", 7, 0, 0),
        entry(0, 5, "k", 7, 0),  # a string not sent yet
        body(o=[[11, [[WEB, 5, "k", 7, 0], [2, 6, 1, 7, 0]]]]),
        entry(WEB, 5, -1, 7, 0),
        entry(WEB, 1 << 32, "k", 7, 0),
        entry(WEB, 5, "k", 0, 0),  # version 0
        entry(WEB, 5, "k", 1 << 63, 0),
        entry(WEB, 5, "k", 7, (1 << 40) + 1),
        entry(WEB, 5, "k", 7, True),
        entry(WEB, 5, "k", "7", 0),
        entry("Web.weft.local.", 5, "k", 7, 0),  # not in normal form
        entry("web.weft.local", 5, "k", 7, 0),  # not absolute
        entry("we b.weft.local.", 5, "k", 7, 0),
        entry("x" * 64 + ".weft.local.", 5, "k", 7, 0),
        entry("a." * 126 + "bc.", 5, "k", 7, 0),  # 254 characters before the dot
        entry(WEB, 5, "", 7, 0),  # an empty key
        entry(WEB, 5, "k" * (MAX_KEY + 1), 7, 0),
        entry(WEB, 5, "netns:a\x1b[2J", 7, 0),  # a key that would drive a terminal
        entry(WEB, 5, b"netns:a", 7, 0),
        entry(5, 5, "k", 7, 0),
        body(o=[[11, [[WEB, 5, "netns:a", 7, 0], [1, 6, "k", 7, 0]]]]),  # a key sent, then used as a name
    ],
)
def test_anything_malformed_is_a_decode_error(raw: object) -> None:
    with pytest.raises(DecodeError) as caught:
        DnsUpdate.decode(pack(raw), 0.0)
    assert caught.value.kind == "dns"


@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_a_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        DnsUpdate.decode(data, 0.0)


def test_a_valid_body_decodes() -> None:
    """The malformed cases above differ from this one by one field each."""
    update = DnsUpdate.decode(pack(body()), 0.0)
    assert list(update.entries.values()) == [Entry(WEB, 5, "netns:a", 11, 7)]
    # Later appearances of a string are the number of its first: across entries and origins, as a name or a key.
    again = body(
        o=[[11, [[WEB, 5, "netns:a", 7, 0], [0, 6, 1, 8, 0]]], [22, [[0, 5, "db", 9, 1], ["db.x.", 7, 2, 3, 0]]]]
    )
    assert sorted(DnsUpdate.decode(pack(again), 0.0).entries.values(), key=str) == sorted(
        [
            Entry(WEB, 5, "netns:a", 11, 7),
            Entry(WEB, 6, "netns:a", 11, 8),
            Entry(WEB, 5, "db", 22, 9, tombstone=0.0),
            Entry("db.x.", 7, "db", 22, 3),
        ],
        key=str,
    )
