"""Per-second buckets over a sliding window (shared by the breaker and the retry budget)."""

from __future__ import annotations

from proxy.window import SecondBuckets


def test_counts_stay_until_their_second_leaves_the_window() -> None:
    """A count made at t stays in the window for `window` whole seconds, then is zeroed."""
    buckets = SecondBuckets(3.0, 2, 100.2)
    first, second = buckets.rings
    first[buckets.idx] += 5
    buckets.advance(101.5)
    second[buckets.idx] += 1
    buckets.advance(102.9)
    assert (sum(first), sum(second)) == (5, 1)
    buckets.advance(103.0)  # second 100 has left the 3 s window
    assert (sum(first), sum(second)) == (0, 1)
    assert buckets.edge == 104.0


def test_a_long_pause_clears_everything() -> None:
    """After more than a window of silence every bucket is zero."""
    buckets = SecondBuckets(2.0, 1, 10.0)
    (ring,) = buckets.rings
    ring[buckets.idx] += 3
    buckets.advance(50.0)
    assert sum(ring) == 0 and buckets.idx == 50 % 2


def test_one_second_window_holds_only_the_current_second() -> None:
    """With a 1 s window, a count is gone as soon as the next second starts."""
    buckets = SecondBuckets(1.0, 1, 100.0)
    (ring,) = buckets.rings
    ring[buckets.idx] += 1
    buckets.advance(101.0)
    assert sum(ring) == 0


def test_edge_is_the_start_of_the_next_second() -> None:
    """A new window's edge is the next whole second after ``now``."""
    assert SecondBuckets(3.0, 1, 100.2).edge == 101.0
