"""The sharding plan as plain data: placement, per-rank sizes, memory, validation (no TF)."""

import numpy as np
import pytest

from gmeta.trainer.embedding.plan import ShardingPlan, TableConfig


def _plan(world_size=3):
    return ShardingPlan.build(
        tables=[TableConfig("item", 10, 8), TableConfig("user", 2, 4, hashed=True)],
        feature_tables={"item_id": "item", "hist_items": "item", "user_id": "user"},
        world_size=world_size)


def test_owner_and_local_row_follow_modulo_rule():
    """Row r lives on rank r % N at local row r // N, for scalars and arrays."""
    plan = _plan(3)
    assert plan.owner(7) == 1 and plan.local_row(7) == 2
    rows = np.arange(10)
    np.testing.assert_array_equal(plan.owner(rows), [0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(plan.local_row(rows), [0, 0, 0, 1, 1, 1, 2, 2, 2, 3])


def test_rows_on_rank_cover_table_exactly_once():
    """Every row is on exactly one rank, in local-row order; uneven and tiny tables included."""
    for n in (1, 2, 3, 4, 7):
        plan = _plan(n)
        for t in plan.tables:
            got = np.concatenate([plan.global_rows(t.name, r) for r in range(n)])
            assert sorted(got.tolist()) == list(range(t.num_rows))
            assert sum(plan.rows_on_rank(t.name, r) for r in range(n)) == t.num_rows
            for r in range(n):
                g = plan.global_rows(t.name, r)
                assert g.size == plan.rows_on_rank(t.name, r)
                np.testing.assert_array_equal(plan.local_row(g), np.arange(g.size))
    plan = _plan(3)
    assert [plan.rows_on_rank("item", r) for r in range(3)] == [4, 3, 3]
    assert [plan.rows_on_rank("user", r) for r in range(3)] == [1, 1, 0]


def test_memory_per_rank_and_replicated():
    """Bytes per rank = rows * dim * 4 * (1 + slots); replicated = the full tables on each rank."""
    plan = _plan(3)
    # rank 0: item 4 rows x 8, user 1 row x 4
    assert plan.bytes_on_rank(0) == (4 * 8 + 1 * 4) * 4
    assert plan.bytes_on_rank(2, slots_per_row=2) == (3 * 8 + 0) * 4 * 3
    assert sum(plan.bytes_per_rank(1)) == plan.replicated_bytes(1)
    assert plan.replicated_bytes(0) == (10 * 8 + 2 * 4) * 4
    big = ShardingPlan.build([TableConfig("t", 1_000_000, 32)], {"f": "t"}, 2)
    assert big.bytes_per_rank(1) == [big.replicated_bytes(1) // 2] * 2


def test_feature_lookup_and_plan_is_hashable_data():
    """Features map to tables; sharing is explicit; the plan is frozen, hashable, comparable."""
    plan = _plan(2)
    assert plan.table_of("hist_items").name == "item"
    assert plan.features_of("item") == ("hist_items", "item_id")
    assert plan.features == ("hist_items", "item_id", "user_id")
    assert hash(plan) == hash(_plan(2)) and plan == _plan(2)
    assert plan.with_world_size(3) == _plan(3)
    with pytest.raises(Exception):
        plan.world_size = 5  # frozen


@pytest.mark.parametrize("kwargs, message", [
    (dict(tables=[TableConfig("a", 5, 2)], feature_tables={"f": "b"}, world_size=1), "unknown table 'b'"),
    (dict(tables=[TableConfig("a", 5, 2), TableConfig("a", 3, 2)], feature_tables={"f": "a"},
          world_size=1), "duplicate table names"),
    (dict(tables=[TableConfig("a", 5, 2), TableConfig("b", 3, 2)], feature_tables={"f": "a"},
          world_size=1), "used by no feature"),
    (dict(tables=[TableConfig("a", 5, 2)], feature_tables={"f": "a"}, world_size=0), "world_size"),
    (dict(tables=[], feature_tables={}, world_size=1), "at least one table"),
    (dict(tables=[TableConfig("a", 2 ** 61, 2), TableConfig("b", 3, 2)],
          feature_tables={"f": "a", "g": "b"}, world_size=1), "below 2\\*\\*62"),
])
def test_build_rejects_bad_plans_with_named_errors(kwargs, message):
    """Bad plans fail at build time with the offending name in the message."""
    with pytest.raises(ValueError, match=message):
        ShardingPlan.build(**kwargs)


def test_table_config_validation_and_unknown_names():
    """Tables need a name, rows >= 1 and dim >= 1; unknown names raise KeyError listing options."""
    with pytest.raises(ValueError, match="num_rows"):
        TableConfig("t", 0, 4)
    with pytest.raises(ValueError, match="dim"):
        TableConfig("t", 4, 0)
    with pytest.raises(ValueError, match="name"):
        TableConfig("", 4, 4)
    plan = _plan(2)
    with pytest.raises(KeyError, match="item"):
        plan.table_of("nope")
    with pytest.raises(ValueError, match="rank 2"):
        plan.rows_on_rank("item", 2)
