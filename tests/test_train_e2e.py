"""`gmeta train` end to end on synthetic cold-start data: every zoo model, reported next to its
baselines (the plain network trained alongside, unadapted and fine-tuned; item mean; constant;
the generator's oracle) in per-task metrics with intervals, and clear errors for bad flags and
data.

The claims are the ones the default synthetic data supports (README, "What a run reports"):
adaptation lifts the pooled AUC (each user's level) well above the unadapted model, the model
ranks within users far above chance and below the oracle. Whether adaptation beats the plain
network *within* users is reported, not asserted: on this data it does not (see the README).
"""

import json

import pytest

from conftest import REPO, last_json, run_gmeta

MODELS = ["melu", "maml_dnn", "maml_esmm", "metaemb"]
MARGIN_POOLED_OVER_UNADAPTED = 0.01   # pooled AUC points
MARGIN_GAUC_OVER_CONSTANT = 0.10      # GAUC points above chance
TRAIN_FLAGS = ["--epochs", "3", "--tracking-uri", "none", "--log-every", "0", "--no-saved-model",
               "--checkpoint-dir", "none"]
SCORERS = {"adapted", "unadapted", "plain", "plain_finetuned", "item_mean", "constant", "oracle"}


gmeta = run_gmeta


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    gmeta("datagen", "--out", out, "--seed", "0", "--quiet", cwd=REPO)
    return out


@pytest.mark.parametrize("model", MODELS)
def test_every_model_is_reported_against_its_baselines(model, synth, tmp_path):
    proc = gmeta("train", "--model", model, "--data", synth, "--output-dir", tmp_path / "runs",
                 "--results-json", tmp_path / "results.json", *TRAIN_FLAGS, cwd=tmp_path)
    res = last_json(proc)
    assert set(res) == {"user_cold", "item_cold", "user_item_cold"}  # val chooses, it is not a result
    assert json.loads((tmp_path / "results.json").read_text()) == res
    cold = res["user_cold"]
    assert cold["rows"] == 4000 and cold["tasks"] == 400
    section = cold["auc"]
    assert SCORERS <= set(section)
    gauc = {name: section[name]["gauc"] for name in SCORERS}
    for name, m in gauc.items():
        assert m["lo"] <= m["value"] <= m["hi"], (name, m)
    assert cold["auc_adapted"] > cold["auc_unadapted"] + MARGIN_POOLED_OVER_UNADAPTED, cold
    assert gauc["adapted"]["value"] > gauc["constant"]["value"] + MARGIN_GAUC_OVER_CONSTANT
    assert gauc["adapted"]["hi"] < gauc["oracle"]["lo"]
    assert gauc["constant"]["value"] == 0.5
    diff = section["differences"]["plain_finetuned"]["gauc"]
    assert diff["lo"] <= diff["diff"] <= diff["hi"] and diff["tasks"] > 300
    assert "adapted - plain, fine-tuned" in proc.stderr
    if model == "maml_esmm":
        assert cold["auc_ctcvr"]["adapted"]["gauc"]["value"] is not None
        assert cold["auc_ctcvr_oracle"] is not None


def test_bad_flags_and_data_give_clear_errors(tmp_path, synth):
    proc = gmeta("train", "--model", "nosuch", "--data", synth, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--model: invalid choice: 'nosuch'" in proc.stderr
    proc = gmeta("train", "--model", "melu", "--data", tmp_path / "missing", "--tracking-uri", "none",
                 cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr and "missing" in proc.stderr
    proc = gmeta("train", "--model", "melu", "--data", synth, "--eval-splits", "nope",
                 "--tracking-uri", "none", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--eval-splits ['nope']" in proc.stderr
    proc = gmeta("train", "--model", "melu", "--data", synth, "--support-size", "lots", cwd=tmp_path,
                 check=False)
    assert proc.returncode != 0 and "--support-size: expected 'auto' or an integer" in proc.stderr
    proc = gmeta("train", "--model", "melu", "--data", synth, "--meta", "none", "--plain-baseline",
                 "runs/x", "--tracking-uri", "none", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "a --meta none run is itself the plain network" in proc.stderr
    proc = gmeta("train", "--model", "melu", "--data", synth, "--epoch", "1", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "unrecognized arguments: --epoch 1" in proc.stderr  # no abbreviations
    proc = gmeta("train", "--model", "metaemb", "--data", synth, "--extra", "alpah=0.2", "--tracking-uri", "none",
                 cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--extra alpah: not a setting of model metaemb" in proc.stderr
    assert "'alpha'" in proc.stderr


def test_divergence_stops_with_a_clear_message(tmp_path, synth):
    """An absurd learning rate makes the loss rise or go NaN: the run stops, says why and what
    to change, and exits non-zero instead of training on."""
    proc = gmeta("train", "--model", "melu", "--data", synth, "--outer-lr", "50", "--inner-lr", "50",
                 "--epochs", "3", "--plain-baseline", "off", "--tracking-uri", "none", "--log-every", "0",
                 "--output-dir", tmp_path / "runs", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "TrainingDiverged" in proc.stderr and "lower --outer-lr" in proc.stderr, proc.stderr[-2000:]
