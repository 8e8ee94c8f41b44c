"""Extra training phases (MetaEmb's generator) run by the trainer under the step's scaling rule."""

import pytest
from conftest import REPO, horovodrun, read_rank_results


@pytest.mark.parametrize("np_", [pytest.param(2, marks=pytest.mark.slow), 3])  # 3: the fast tier
def test_generator_phase_on_uneven_ranks_equals_single_process(tmp_path, np_):
    """Generator weights after two steps on N ranks with uneven real-task counts equal one
    process on the whole batch: sums over ranks, one division by the global task count."""
    horovodrun(np_, ["phase_equivalence.py", tmp_path, REPO / "tests"], timeout=300)
    for res in read_rank_results(tmp_path, np_):
        assert res["moved"] > 1e-3  # the phase really trained the generator
        assert res["max_diff"] < 1e-6, res
