"""The link index's hash table (tasks.linking._HashTable): one int64 per key holding the
hash and, in its low bits, the owner. Lookups must find every key whatever its owner,
keep the lowest owner of duplicate keys, and only ever err towards "linked"."""

from __future__ import annotations

from array import array

import numpy as np
import pytest

from tasks.linking import _HashTable


def _table(hashes: list[int], owners: list[int], n_owners: int, code: str = "h") -> _HashTable:
    return _HashTable(array("q", hashes), array(code, owners), n_owners)


@pytest.mark.parametrize("code", ["h", "i"])
def test_every_key_is_found_with_its_owner(code: str) -> None:
    rng = np.random.default_rng(7)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=5000, dtype=np.int64).tolist()
    owners = rng.integers(0, 300, size=5000).tolist()
    t = _table(hashes, owners, 300, code)
    assert t.bits == 9 and len(t) == 5000
    pos = t.lookup(np.array(hashes, dtype=np.int64))
    assert (pos >= 0).all()
    assert t.owners_at(pos).tolist() == owners
    assert all(t.find(h) >= 0 for h in hashes[:50])
    absent = rng.integers(-(2**63), 2**63 - 1, size=5000, dtype=np.int64)
    assert (t.lookup(absent) == -1).sum() >= 4990  # (a 55-bit collision could link)


def test_a_key_of_several_records_keeps_one_entry_with_the_lowest_owner() -> None:
    t = _table([42, 42, 42, -7], [5, 2, 9, 1], 16)
    assert len(t) == 2
    pos = t.lookup(np.array([42, -7], dtype=np.int64))
    assert t.owners_at(pos).tolist() == [2, 1]


def test_hashes_differing_only_in_the_owner_bits_are_one_key_and_fail_closed() -> None:
    """Two keys whose hashes differ only in the bits the owner takes are one entry:
    both look linked (never the reverse)."""
    t = _table([0b1000_0000, 0b1000_0011], [1, 0], 4)  # bits = 2
    assert len(t) == 1
    assert (t.lookup(np.array([0b1000_0000, 0b1000_0011, 0b1000_0001])) == 0).all()
    assert t.lookup(np.array([0b0100_0000]))[0] == -1


def test_empty_tables() -> None:
    t = _table([], [], 0)
    assert len(t) == 0 and t.find(1) == -1
    assert t.lookup(np.array([1, 2], dtype=np.int64)).tolist() == [-1, -1]
