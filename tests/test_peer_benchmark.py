"""The peer sampling benchmark adds up the peer loop's 1,024 steps from a few timed rows: the sum must be exact
for a cost that is constant or linear in the row (what a forward over rows 0..i costs)."""
from __future__ import annotations

import pytest

from benchmarks.peer_sampling import GRID, ROWS, interpolated_total


def test_constant_step_cost_adds_up_to_every_position():
    assert interpolated_total({r: 0.5 for r in ROWS}) == pytest.approx(0.5 * GRID[0] * GRID[1])


def test_step_cost_linear_in_the_row_is_summed_exactly():
    cost = {r: 0.1 * (r + 1) for r in ROWS}
    assert interpolated_total(cost) == pytest.approx(sum(0.1 * (i + 1) * GRID[1] for i in range(GRID[0])))
