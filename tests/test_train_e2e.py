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
from pathlib import Path

import pytest
from conftest import REPO, last_json, run_gmeta

MODELS = ["melu", "maml_esmm", "metaemb"]  # metaemb runs maml_dnn's base; maml_dnn itself: test_compare
MARGIN_POOLED_OVER_UNADAPTED = 0.01   # pooled AUC points
MARGIN_GAUC_OVER_CONSTANT = 0.10      # GAUC points above chance
TRAIN_FLAGS = ["--epochs", "3", "--tracking-uri", "none", "--log-every", "0", "--no-saved-model",
               "--checkpoint-dir", "none", "--validation-split", "none", "--support-curve", "none"]
SCORERS = {"adapted", "unadapted", "plain", "plain_finetuned", "item_mean", "item_knn", "constant", "oracle"}


gmeta = run_gmeta


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    gmeta("datagen", "--out", out, "--seed", "0", "--quiet", cwd=REPO)
    return out


# melu in the fast tier; the other models (slow tier) are trained and served in test_serving.py
@pytest.mark.parametrize("model", [MODELS[0], *(pytest.param(m, marks=pytest.mark.slow) for m in MODELS[1:])])
def test_every_model_is_reported_against_its_baselines(model, synth, tmp_path):
    proc = gmeta("train", "--model", model, "--data", synth, "--output-dir", tmp_path / "runs",
                 "--results-json", tmp_path / "results.json", *TRAIN_FLAGS, cwd=tmp_path)
    res = last_json(proc)
    assert res["splits"] == ["user_cold", "item_cold", "user_item_cold"]  # val chooses, it is not a result
    assert json.loads((tmp_path / "results.json").read_text()) == res
    assert res["run_id"] is None and res["report_artifact"] is None  # --tracking-uri none
    report = json.loads(Path(res["report"]).read_text())
    assert set(report) == set(res["splits"]) and Path(res["export"]).parent == Path(res["report"]).parent
    cold = report["user_cold"]
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
    # the last stdout line: per split, flat headline numbers taken from the report, short to read
    assert len(proc.stdout.strip().splitlines()[-1]) < 4000
    head = res["user_cold"]
    assert (head["tasks"], head["rows"]) == (400, 4000) and head["gauc_adapted"] == cold["gauc_adapted"]
    assert (head["gauc_adapted_lo"], head["gauc_adapted_hi"]) == (gauc["adapted"]["lo"], gauc["adapted"]["hi"])
    for name in ("adapted", "unadapted", "plain", "plain_finetuned", "item_mean", "item_knn"):
        assert head[f"gauc_{name}"] == gauc[name]["value"]
        assert head[f"ndcg10_{name}"] == section[name]["ndcg@10"]["value"]
        if name != "adapted":
            d = section["differences"][name]["gauc"]
            got = [head[f"gauc_adapted_minus_{name}{end}"] for end in ("", "_lo", "_hi")]
            assert got == [d["diff"], d["lo"], d["hi"]], name
    assert "gauc_constant" not in head and "gauc_oracle" not in head  # in the report, not the headline
    assert all(not isinstance(v, (dict, list)) for h in res["splits"] for v in res[h].values())


def test_bad_flags_and_data_give_clear_errors(tmp_path, synth, capsys):
    """Through the real command (two cases) and, for the rest, through the same parser and config
    code in process (each `gmeta train` process costs a TensorFlow start-up)."""
    from gmeta.cli import build_parser_for
    from gmeta.trainer.config import config_from_args
    from gmeta.trainer.run.training import train

    # a misspelled flag: one line naming the command, the closest flag and the help; status 2
    proc = gmeta("train", "--model", "melu", "--data", synth, "--epoch", "1", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gmeta train: unknown flag --epoch (did you mean --epochs?); see gmeta train --help"], proc.stderr
    proc = gmeta("train", "--model", "melu", "--data", tmp_path / "missing", "--tracking-uri", "none",
                 cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr and "missing" in proc.stderr

    def parse(*argv, model="melu"):
        argv = ["train", "--model", model, "--data", str(synth), "--tracking-uri", "none", *argv]
        return config_from_args(build_parser_for(argv).parse_args(argv))

    for argv, message in ((["--support-size", "lots"], "--support-size: expected 'auto' or an integer"),
                          (["--model", "nosuch"], "--model: invalid choice: 'nosuch'"),
                          (["--epoch", "1", "--inner-lrr=1", "--outer_lr", "2"],  # no abbreviations
                           "gmeta train: unknown flags --epoch (did you mean --epochs?), --inner-lrr (did you mean "
                           "--inner-lr?), --outer_lr (did you mean --outer-lr?); see gmeta train --help")):
        with pytest.raises(SystemExit) as exc:
            parse(*argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "usage:" not in err, err
    for argv, message in ((["--meta", "none", "--plain-baseline", "runs/x"], "a --meta none run is itself the plain"),
                          (["--adapt", "head,last"], "head already includes last"),
                          (["--register-as", "m@a"], "needs a name and MLflow tracking")):
        with pytest.raises(ValueError, match=message):
            parse(*argv)
    with pytest.raises(ValueError, match=r"--extra alpah: not a setting of model metaemb.*'alpha'"):
        train(parse("--extra", "alpah=0.2", model="metaemb"))
    with pytest.raises(ValueError, match=r"--eval-splits \['nope'\]"):
        train(parse("--eval-splits", "nope"))


def test_divergence_stops_with_a_clear_message(tmp_path, synth):
    """An absurd learning rate makes the loss rise or go NaN: the run stops, says why and what
    to change, and exits non-zero instead of training on."""
    proc = gmeta("train", "--model", "melu", "--data", synth, "--outer-lr", "50", "--inner-lr", "50",
                 "--epochs", "3", "--plain-baseline", "off", "--tracking-uri", "none", "--log-every", "0",
                 "--output-dir", tmp_path / "runs", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "TrainingDiverged" in proc.stderr and "lower --outer-lr" in proc.stderr, proc.stderr[-2000:]
