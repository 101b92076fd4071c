"""How selection work is dealt out over processes (`fisher_core.select.parallel`)."""

from __future__ import annotations

from fisher_core.select.parallel import assign_owners, solve_cost


def test_groups_stay_together_and_the_longest_go_first_to_the_least_loaded():
    groups = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}
    costs = {"q": 5.0, "k": 1.0, "v": 1.0, "o": 2.0, "gate": 6.0, "up": 3.0, "down": 4.0}
    owners = assign_owners(groups, costs, world=2)
    assert owners["q"] == owners["k"] == owners["v"] and owners["gate"] == owners["up"]
    # LPT: gate (9) → 0, q (7) → 1, down (4) → 1 (load 7 < 9), o (2) → 0 (9 < 11)
    assert owners == {"q": 1, "k": 1, "v": 1, "o": 0, "gate": 0, "up": 0, "down": 1}
    assert assign_owners(groups, costs, world=2) == owners  # deterministic
    assert set(assign_owners(groups, costs, world=8).values()) == {0, 1, 2, 3}  # one group per process at most
    assert set(assign_owners(groups, costs, world=1).values()) == {0}


def test_a_shared_input_factor_is_costed_once():
    assert solve_cost((8, 4), shares_input=False) == 8**3 + 4**3 + 8 * 4 * 4
    assert solve_cost((8, 4), shares_input=True) == 8**3 + 8 * 4 * 4
