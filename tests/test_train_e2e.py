"""`gmeta train` end to end on synthetic cold-start data: every zoo model against its unadapted
predictions and its non-meta baseline, and clear errors for bad flags and data."""

import pytest

from conftest import REPO, last_json, run_gmeta

MODELS = ["melu", "maml_dnn", "maml_esmm", "metaemb"]
# The learning claim each model must meet on cold-user query sets (stated margins, AUC points).
MARGIN_OVER_UNADAPTED = 0.01
MARGIN_OVER_PLAIN = 0.005
TRAIN_FLAGS = ["--epochs", "3", "--tracking-uri", "none", "--log-every", "0"]


gmeta = run_gmeta


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    gmeta("datagen", "--out", out, "--seed", "0", "--quiet", cwd=REPO)
    return out


@pytest.fixture(scope="module")
def plain_results(synth, tmp_path_factory):
    """The non-meta baseline (--meta none) of every model, trained once per module."""
    cwd = tmp_path_factory.mktemp("plain")
    return {m: last_json(gmeta("train", "--model", m, "--data", synth, "--meta", "none",
                               "--output-dir", cwd / "runs", *TRAIN_FLAGS, cwd=cwd))
            for m in MODELS}


@pytest.mark.parametrize("model", MODELS)
def test_meta_training_beats_unadapted_and_plain_on_cold_users(model, synth, plain_results, tmp_path):
    proc = gmeta("train", "--model", model, "--data", synth, "--output-dir", tmp_path / "runs",
                 *TRAIN_FLAGS, cwd=tmp_path)
    res = last_json(proc)
    assert set(res) == {"user_cold", "item_cold", "user_item_cold"}
    cold = res["user_cold"]
    plain = plain_results[model]["user_cold"]
    assert cold["rows"] == plain["rows"] > 0
    assert 0.5 < cold["auc_oracle"] <= 1.0
    assert cold["auc_adapted"] > cold["auc_unadapted"] + MARGIN_OVER_UNADAPTED, cold
    assert cold["auc_adapted"] > plain["auc_unadapted"] + MARGIN_OVER_PLAIN, (cold, plain)
    assert cold["auc_adapted"] < cold["auc_oracle"]
    if model == "maml_esmm":
        assert cold["auc_ctcvr_adapted"] is not None and cold["auc_ctcvr_oracle"] is not None


def test_bad_flags_and_data_give_clear_errors(tmp_path, synth):
    proc = gmeta("train", "--model", "nosuch", "--data", synth, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--model 'nosuch' is not in the zoo" in proc.stderr
    proc = gmeta("train", "--model", "melu", "--data", tmp_path / "missing", "--tracking-uri", "none",
                 cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr and "missing" in proc.stderr
    proc = gmeta("train", "--model", "melu", "--data", synth, "--eval-splits", "nope",
                 "--tracking-uri", "none", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--eval-splits ['nope']" in proc.stderr
