"""The parallel pool (all segments at once) against the explicit pool written one note at a time."""

import pytest
import torch

from fidelity.models.state_pool import StatePool, pool_segments


def random_notes(batch, length, dim, write_rate, seed, ties=False):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64)
    importance = torch.rand(batch, length, generator=generator, dtype=torch.float64)
    if ties:  # few distinct importances: the tie rule (newer wins) decides often
        importance = (importance * 3).floor() / 3
    written = torch.rand(batch, length, generator=generator) < write_rate
    return values, importance, written


def explicit_pools(initial, values, importance, written, start):
    """The pool each position sees before (and just after) writing its own note, written one
    note at a time with StatePool.write: lists of (batch, size) positions and validity."""
    pool = StatePool(
        initial.values.clone(),
        initial.importance.clone(),
        initial.positions.clone(),
        initial.valid.clone(),
        initial.policy,
    )
    before, after = [], []
    for t in range(values.shape[1]):
        before.append((pool.positions.clone(), pool.valid.clone()))
        pool.write(values[:, t], importance[:, t], start + t, written[:, t])
        after.append((pool.positions.clone(), pool.valid.clone()))
    return before, after, pool


def note_sets(positions, valid):
    return [sorted(positions[row][valid[row]].tolist()) for row in range(positions.shape[0])]


@pytest.mark.parametrize("policy", ["priority", "fifo"])
@pytest.mark.parametrize("segment_size", [1, 5, 16, 64])
@pytest.mark.parametrize(("write_rate", "ties"), [(0.3, False), (1.0, False), (0.5, True)])
def test_parallel_pool_membership_matches_explicit_writes(policy, segment_size, write_rate, ties):
    batch, length, dim, size, start = 3, 53, 4, 6, 20
    values, importance, written = random_notes(
        batch, length, dim, write_rate, seed=segment_size, ties=ties
    )
    # An initial pool from earlier writes, in scrambled slot order (as step() leaves it).
    initial = StatePool.empty(batch, size, dim, policy, dtype=torch.float64)
    prior_values, prior_importance, prior_written = random_notes(batch, 15, dim, 0.5, seed=99)
    for t in range(15):
        initial.write(
            prior_values[:, t], prior_importance[:, t], start - 15 + t, prior_written[:, t]
        )
    before, after, final = explicit_pools(initial, values, importance, written, start)

    segments, parallel_final = pool_segments(
        initial, values, importance, written, start, segment_size, inclusive=True
    )
    n_segments, width = segments.query_positions.shape
    assert n_segments * width >= length and (n_segments - 1) * width < length
    for t in range(n_segments * width):
        segment, query = divmod(t, width)
        if t >= length:  # padding queries see nothing
            assert segments.query_positions[segment, query] == -1
            assert not segments.member[:, segment, query].any()
            continue
        assert segments.query_positions[segment, query] == start + t
        positions = segments.positions[:, segment]
        for member, (want_positions, want_valid) in (
            (segments.member[:, segment, query], before[t]),
            (segments.member_inclusive[:, segment, query], after[t]),
        ):
            assert note_sets(positions, member) == note_sets(want_positions, want_valid)
    # The candidates' values are the notes written at those positions (or the initial pool's).
    known = {}
    for row in range(batch):
        for slot in range(size):
            if initial.valid[row, slot]:
                known[row, int(initial.positions[row, slot])] = initial.values[row, slot]
        for t in range(length):
            known[row, start + t] = values[row, t]
    member_any = segments.member_inclusive.any(dim=2)  # (batch, n_segments, n_candidates)
    for row, segment, slot in member_any.nonzero().tolist():
        position = int(segments.positions[row, segment, slot])
        torch.testing.assert_close(segments.values[row, segment, slot], known[row, position])
    assert note_sets(parallel_final.positions, parallel_final.valid) == note_sets(
        final.positions, final.valid
    )
    for row in range(batch):
        for slot in range(size):
            if parallel_final.valid[row, slot]:
                position = int(parallel_final.positions[row, slot])
                torch.testing.assert_close(parallel_final.values[row, slot], known[row, position])


def test_parallel_pool_gradients_reach_the_written_values():
    values, importance, written = random_notes(2, 30, 4, 0.5, seed=3)
    values.requires_grad_(True)
    initial = StatePool.empty(2, 5, 4, "priority", dtype=torch.float64)
    segments, _ = pool_segments(initial, values, importance, written, 0, 8)
    (segments.values * segments.member.any(dim=2)[..., None]).sum().backward()
    seen = values.grad.abs().sum(-1) > 0
    assert (seen <= written).all() and seen.any()


@pytest.mark.parametrize("policy", ["priority", "fifo"])
@pytest.mark.parametrize("inclusive", [False, True])
def test_candidates_no_query_sees_are_dropped(policy, inclusive):
    """At a high write rate many notes written inside a segment never enter a query's pool
    (priority: too unimportant), and empty pool slots are never seen: the segments keep, per
    segment, the candidates some query sees first (best-first), padded with unseen ones to
    the largest count, and far fewer than the pool plus the segment's notes. Which notes each
    query sees is checked against explicit writes above."""
    batch, length, size, segment_size = 3, 200, 6, 40
    values, importance, written = random_notes(batch, length, 4, 0.9, seed=11)
    initial = StatePool.empty(batch, size, 4, policy, dtype=torch.float64)
    segments, _ = pool_segments(
        initial, values, importance, written, 0, segment_size, inclusive=inclusive
    )
    member = segments.member_inclusive if inclusive else segments.member
    seen = member.any(dim=2) | segments.member.any(dim=2)  # (batch, n_segments, candidates)
    n_seen = seen.sum(-1)
    most_written = written.view(batch, -1, segment_size).sum(-1).max()
    assert seen.shape[-1] == n_seen.max() <= size + most_written
    if policy == "priority":  # fifo: every new note enters the pool (the newest is the best)
        assert seen.shape[-1] < size + most_written
    # seen candidates first: after a segment's first unseen one, none is seen
    assert not (seen & (torch.cumsum(~seen, dim=-1) > 0)).any()
