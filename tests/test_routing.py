"""Routing tables against the SPEC §1 formula and its worked values."""

import math

import numpy as np
import pytest

from dtr_jax import routing
from dtr_jax.routing import routing_table


def spec_dtr_table(T, C, beta, alpha):
    """SPEC §1 written out row by row, independently of the module."""
    cb = math.floor(beta * C)
    last = C - cb
    table = np.zeros((T, C), np.uint8)
    for t in range(T):
        u = np.float64(t) / np.float64(T - 1)
        start = int(np.round(u**alpha * last))
        table[t, start : start + cb] = 1
    return table


@pytest.mark.parametrize("C", [384, 768, 1024, 1152])
@pytest.mark.parametrize("beta", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_dtr_table_equals_spec_formula(C, beta, alpha):
    table = routing_table("dtr", 1000, C, beta=beta, alpha=alpha)
    assert table.shape == (1000, C)
    np.testing.assert_array_equal(table, spec_dtr_table(1000, C, beta, alpha))
    assert (table.sum(1) == math.floor(beta * C)).all()


@pytest.mark.parametrize(
    "C, cb, last, starts",
    [
        (1024, 819, 205, {0: 0, 250: 1, 500: 13, 750: 65, 999: 205}),
        (1152, 921, 231, {0: 0, 999: 231}),
        (768, 614, 154, {0: 0, 999: 154}),
        (384, 307, 77, {0: 0, 999: 77}),
    ],
)
def test_worked_values(C, cb, last, starts):
    table = routing_table("dtr", 1000, C)
    assert routing.active_channels(C, 0.8) == cb and C - cb == last
    for t, start in starts.items():
        row = table[t]
        assert row.argmax() == start, t
        assert row[start : start + cb].all() and row.sum() == cb


def test_dtr_windows_overlap_and_move_monotonically():
    table = routing_table("dtr", 1000, 768)
    starts = table.argmax(1)
    assert (np.diff(starts) >= 0).all()
    overlap = (table[1:] & table[:-1]).sum(1)
    assert overlap.min() >= 614 - 154  # adjacent tasks share most channels


def test_none_and_beta_one_are_all_ones():
    np.testing.assert_array_equal(routing_table("none", 10, 16), np.ones((10, 16)))
    np.testing.assert_array_equal(routing_table("dtr", 10, 16, beta=1.0), np.ones((10, 16)))
    assert routing.model_tables("none", 10, 16, depth=3) is None


def test_random_tables_count_reproducible_and_distinct_per_block():
    T, C, beta = 1000, 384, 0.8
    table = routing_table("random", T, C, beta=beta, seed=3)
    assert (table.sum(1) == math.floor(beta * C)).all()
    np.testing.assert_array_equal(table, routing_table("random", T, C, beta=beta, seed=3))
    assert not np.array_equal(table, routing_table("random", T, C, beta=beta, seed=4))
    assert not np.array_equal(table[0], table[1])  # rows drawn per task
    tables = routing.model_tables("random", T, C, depth=4, beta=beta, seed=3)
    assert tables.shape == (4, T, C)
    for i in range(4):
        for j in range(i):
            assert not np.array_equal(tables[i], tables[j])
    np.testing.assert_array_equal(tables, routing.model_tables("random", T, C, 4, beta, seed=3))


def test_model_tables_share_dtr_across_blocks():
    tables = routing.model_tables("dtr", 1000, 384, depth=12)
    assert tables.shape == (1, 1000, 384) and tables.dtype == np.uint8
    np.testing.assert_array_equal(tables[0], routing_table("dtr", 1000, 384))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(kind="mystery"), "kind"),
        (dict(beta=0.0), "beta"),
        (dict(beta=1.5), "beta"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(num_tasks=0), "num_tasks"),
        (dict(channels=-4), "channels"),
        (dict(channels=2, beta=0.3), "beta"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, field):
    args = dict(kind="dtr", num_tasks=1000, channels=384, beta=0.8, alpha=4.0) | kwargs
    with pytest.raises(ValueError, match=field):
        routing_table(**args)
