"""`gmeta compare`: runs side by side in per-task metrics, and which differences are significant."""

from pathlib import Path

from conftest import last_json, run_gmeta, train_report

FLAGS = ["--epochs", "1", "--log-every", "0", "--plain-baseline", "off", "--eval-splits", "user_cold",
         "--no-saved-model", "--checkpoint-dir", "none", "--support-curve", "none"]


def _train(tmp_path, data, *extra, tracking="none"):
    proc = run_gmeta("train", "--model", "maml_dnn", "--data", data, "--tracking-uri", tracking,
                     "--output-dir", tmp_path / "runs", *FLAGS, *extra, cwd=tmp_path)
    export = Path(proc.stderr.split("export: ")[-1].split()[0])
    return (tmp_path / export).parent, train_report(proc)


def test_compare_reports_intervals_and_paired_significance(tiny_synth, tmp_path):
    run_a, res_a = _train(tmp_path, tiny_synth, "--seed", "1")
    run_b, _ = _train(tmp_path, tiny_synth, "--seed", "2")
    proc = run_gmeta("compare", run_a, run_b, run_a, "--metric", "gauc", cwd=tmp_path)
    table = last_json(proc)["user_cold"]
    assert [r["run"] for r in table["runs"]] == [str(run_a), str(run_b), str(run_a)]
    first = table["runs"][0]
    assert first["value"] == res_a["user_cold"]["auc"]["adapted"]["gauc"]["value"]
    assert first["lo"] <= first["value"] <= first["hi"]
    vs_b, vs_self = table["vs_first"]
    assert vs_b["tasks"] > 0 and vs_b["lo"] <= vs_b["diff"] <= vs_b["hi"]
    assert vs_self["diff"] == 0.0 and vs_self["significant"] is False   # a run equals itself
    assert "NOT significant" in proc.stderr
    # every run shows its own adapted minus the item baselines, as its report has them
    for base in ("item_mean", "item_knn"):
        want = res_a["user_cold"]["auc"]["differences"][base]["gauc"]
        assert first["adapted_minus_baselines"][base] == want
    assert "adapted - item_knn" in proc.stderr
    # the baselines of a run compare the same way
    for base in ("item_mean", "item_knn"):
        item = last_json(run_gmeta("compare", run_a, run_b, "--scorer", base, cwd=tmp_path))
        assert item["user_cold"]["vs_first"][0]["diff"] == 0.0  # same data, same baseline scores


def test_compare_errors_name_the_run(tmp_path):
    proc = run_gmeta("compare", tmp_path, "--tracking-uri", f"sqlite:///{tmp_path}/m.db", cwd=tmp_path,
                     check=False)
    assert proc.returncode != 0 and "no eval_results.json" in proc.stderr
    proc = run_gmeta("compare", "0" * 32, "--tracking-uri", f"sqlite:///{tmp_path}/m.db", cwd=tmp_path,
                     check=False)
    assert proc.returncode != 0 and "not a local run directory" in proc.stderr
