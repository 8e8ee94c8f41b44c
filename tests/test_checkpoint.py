"""Never lose a run: checkpoints hold the whole run's state, are written atomically, load on any
worker count, and `gmeta train --resume` continues a run killed with SIGKILL to the same final
metrics as the uninterrupted run; `--init-from` starts a new run from trained weights.

Every multi-worker case is a real horovodrun job (Gloo) on the tiny synthetic dataset."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, REPO, WORKERS, horovodrun, run_gmeta, train_report

from gmeta.trainer.checkpoint.compat import config_differences
from gmeta.trainer.checkpoint.files import (
    COMMITTED,
    FINISHED,
    CheckpointError,
    committed_checkpoints,
    latest_checkpoint,
)
from gmeta.trainer.parallel.launch import horovodrun_command

EVERY = 7
TRAIN = ["train", "--model", "maml_dnn", "--epochs", "2", "--tasks-per-batch", "8", "--log-every", "0", "--no-saved-model",
         "--eval-splits", "user_cold,item_cold", "--validation-split", "none", "--checkpoint-every-steps", str(EVERY),
         "--keep-checkpoints", "0", "--support-curve", "none"]
KEYS = ("auc_adapted", "gauc_adapted")


def _gmeta_hvd(np_, data, *flags, env=None, timeout=300):
    return horovodrun(np_, [BIN / "gmeta", *TRAIN, "--data", data, *flags], timeout=timeout, env=env)


def _assert_same_metrics(a: dict, b: dict, tol=1e-4):
    assert set(a) == set(b)
    for split in a:
        for key in KEYS:
            assert abs(a[split][key] - b[split][key]) <= tol, (split, key, a[split][key], b[split][key])


def _final_meta(ckpt_dir) -> dict:
    return json.loads((Path(latest_checkpoint(str(ckpt_dir))) / "meta.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny_synth, tmp_path_factory):
    """An uninterrupted 2-worker run: its final metrics and its checkpoints."""
    root = tmp_path_factory.mktemp("reference")
    proc = _gmeta_hvd(2, tiny_synth, "--tracking-uri", "none", "--output-dir", root / "runs",
                      "--checkpoint-dir", root / "ckpts")
    return {"result": train_report(proc), "ckpts": root / "ckpts",
            "steps_per_epoch": _final_meta(root / "ckpts")["position"]["steps_per_epoch"]}


# ---------------------------------------------------------------------------------------- resharding
def test_checkpoint_of_two_workers_loads_on_three_and_one_and_three_on_one(tiny_synth, tmp_path):
    """With every variable set to distinct values, every table row, every optimizer slot (lazy
    Adam m and v), the row optimizer's counter and every replicated variable come back equal
    after N -> M, for 2 -> 3, 2 -> 1 and 3 -> 1 (and into replicated tables); --init-from a
    checkpoint copies the model's weights and tables."""
    c2, c3 = tmp_path / "c2", tmp_path / "c3"
    ref2, ref3 = tmp_path / "ref2.npz", tmp_path / "ref3.npz"
    horovodrun(2, ["ckpt_reshard.py", "save", tiny_synth, c2, ref2], timeout=240)
    horovodrun(3, ["ckpt_reshard.py", "load", tiny_synth, f"{c2}:{ref2}:{tmp_path / 'out23.json'}",
                   f"--save={c3}:{ref3}"], timeout=240)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")
    args = [f"{c2}:{ref2}:{tmp_path / 'out21.json'}", f"{c3}:{ref3}:{tmp_path / 'out31.json'}",
            f"--naive={c3}:{ref3}:{tmp_path / 'out31n.json'}", f"--init={c2}:{ref2}:{tmp_path / 'init.json'}"]
    proc = subprocess.run([sys.executable, str(WORKERS / "ckpt_reshard.py"), "load", str(tiny_synth), *args],
                          capture_output=True, text=True, timeout=180, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(ref2) as ref:
        assert int(ref["model/table_optimizer/iterations"]) == 17 and int(ref["model/outer_optimizer/step"]) == 17
        assert np.abs(ref["model/table/item_id/m"]).sum() > 0 and np.abs(ref["plain/table/user_id/v"]).sum() > 0
        assert any(n.startswith("model/inner_lr/") for n in ref.files)
    for name, (written, loaded) in {"out23": (2, 3), "out21": (2, 1), "out31": (3, 1), "out31n": (3, 1)}.items():
        out = json.loads((tmp_path / f"{name}.json").read_text())
        assert (out["written_by"], out["loaded_on"]) == (written, loaded)
        assert out["mismatches"] == [], (name, out["mismatches"])
        assert {"model/table/gender/v", "plain/table/user_id/m", "model/outer_optimizer/step",
                "model/table_optimizer/iterations"} <= set(out["names"])
    # hybrid learners hold a mixed plan: the small feature tables whole, user and item sharded
    mixed = json.loads((tmp_path / "out23.json").read_text())["replicated"]
    assert "gender" in mixed and not {"item_id", "user_id"} & set(mixed), mixed
    init = json.loads((tmp_path / "init.json").read_text())
    assert init["mismatches"] == [] and "model/table/item_id" in init["names"]
    assert init["report"]["model"]["left"] == [] and init["report"]["plain"]["left"] == []
    # the layout: one shard per writer, a manifest written last
    ckpt = Path(latest_checkpoint(str(c2)))
    assert sorted(p.name for p in ckpt.iterdir()) == [COMMITTED, "dense.npz", "meta.json",
                                                      "shard-00000-of-00002.npz", "shard-00001-of-00002.npz"]


# ---------------------------------------------------------------------------------------- kill -9
def _spawn(np_, argv, env, log):
    cmd = horovodrun_command(np_, argv)
    full_env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
                    OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(REPO),
                            start_new_session=True)


def _kill_tree(proc) -> None:
    """SIGKILL the horovodrun we started and every process below it (workers run in sessions of
    their own), by pid."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


@pytest.mark.slow  # fast tier: 1-worker resume of an interrupted run, kill -9 of the chief (test_failures.py)
def test_kill_9_mid_epoch_then_resume_reaches_the_uninterrupted_metrics(reference, tiny_synth, tmp_path):
    """A 2-worker run killed with SIGKILL in epoch 1, steps after its last checkpoint, and
    resumed with --resume ends with the uninterrupted run's metrics; the interrupted epoch's mean
    loss and the whole loss history are the same, so no batch was trained twice or skipped; the
    resumed run continues the same MLflow run."""
    steps = reference["steps_per_epoch"]
    pause = steps + 11 + ((steps + 11) % EVERY == 0)  # mid epoch 1, not on a checkpoint
    last = pause - pause % EVERY                       # the newest checkpoint when it is killed
    assert steps < last < pause < 2 * steps
    ckpts, uri = tmp_path / "ckpts", f"sqlite:///{tmp_path}/mlflow.db"
    flags = ["--data", tiny_synth, "--tracking-uri", uri, "--output-dir", tmp_path / "runs", "--checkpoint-dir", ckpts]
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = _spawn(2, [BIN / "gmeta", *TRAIN, *flags], {"GMETA_FAULTS": f"step_done:pause:{pause}"}, log)
        try:
            deadline = time.monotonic() + 240
            while "pausing after step" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    written = [s for s, _ in committed_checkpoints(str(ckpts))]
    assert written[-1] == last and steps in written, written
    killed_meta = _final_meta(ckpts)
    assert killed_meta["position"] == {"epoch": 1, "step_in_epoch": last - steps, "global_step": last,
                                       "steps_per_epoch": steps}
    # up to the kill the run is the reference run, bit for bit (same seed, same state)
    name = f"ckpt-{last:09d}"
    for file in ("dense.npz", "shard-00000-of-00002.npz", "shard-00001-of-00002.npz"):
        with np.load(Path(reference["ckpts"]) / name / file) as a, np.load(ckpts / name / file) as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files), file

    resumed = _gmeta_hvd(2, tiny_synth, *flags[2:], "--resume")
    assert f"resumed from {ckpts / name}: epoch 1 after step {last - steps}/{steps}" in resumed.stderr
    _assert_same_metrics(reference["result"], train_report(resumed))
    final, ref_final = _final_meta(ckpts), _final_meta(reference["ckpts"])
    assert final["position"] == ref_final["position"] == {"epoch": 2, "step_in_epoch": 0, "global_step": 2 * steps,
                                                          "steps_per_epoch": steps}
    assert final["history"] == ref_final["history"]
    run_id = killed_meta["mlflow_run_id"]
    assert run_id and final["mlflow_run_id"] == run_id and f"mlflow run: {run_id}" in resumed.stderr

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    losses = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in losses) == [0, 1]
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(final["history"]["loss"])
    assert (ckpts / FINISHED).exists()


# ---------------------------------------------------------------------------------------- atomicity
# 1 worker, the plain network (--meta none): the same checkpoint machinery, and the export that
# --init-from starts a MAML run from
ONE = ["train", "--model", "maml_dnn", "--meta", "none", "--epochs", "1", "--tasks-per-batch", "8", "--no-saved-model",
       "--log-every", "0", "--eval-splits", "user_cold", "--plain-baseline", "off", "--tracking-uri", "none",
       "--checkpoint-every-steps", "10", "--support-curve", "none", "--early-stopping", "0"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_synth, tmp_path_factory):
    """A 1-worker run (with checkpoints, like the runs it is compared with) and its export."""
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = run_gmeta(*ONE, "--data", tiny_synth, "--output-dir", root / "runs", "--checkpoint-dir", root / "ckpts",
                     cwd=root)
    return {"result": train_report(proc), "ckpts": root / "ckpts",
            "export": Path(proc.stderr.split("export: ")[-1].split()[0])}


def test_same_seed_twice_gives_identical_metrics(uninterrupted, tiny_synth, tmp_path):
    """Bit for bit: every metric of the report (checkpoints or not change nothing). The 2-worker
    runs of the kill test show the same over Gloo: identical state at the killed run's last
    checkpoint."""
    proc = run_gmeta(*ONE, "--data", tiny_synth, "--output-dir", tmp_path / "runs", "--checkpoint-dir", "none",
                     cwd=tmp_path)
    assert train_report(proc) == uninterrupted["result"]


@pytest.fixture(scope="module")
def interrupted(tiny_synth, tmp_path_factory):
    """A 1-worker run that dies while writing its second checkpoint (after the shard files,
    before the commit)."""
    root = tmp_path_factory.mktemp("interrupted")
    proc = run_gmeta(*ONE, "--data", tiny_synth, "--output-dir", root / "runs", "--checkpoint-dir", root / "ckpts",
                     cwd=root, check=False, env={"GMETA_FAULTS": "checkpoint_commit:die:20"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "exiting inside checkpoint ckpt-000000020" in proc.stderr
    return root


def _copy(interrupted, tmp_path) -> Path:
    return Path(shutil.copytree(interrupted / "ckpts", tmp_path / "ckpts"))


def test_a_write_interrupted_before_its_commit_leaves_the_previous_checkpoint(interrupted, uninterrupted, tiny_synth,
                                                                              tmp_path):
    """The dead write is invisible: the previous checkpoint is the latest, --resume continues
    from it to the uninterrupted run's metrics and loss history, and the debris is pruned."""
    ckpts = _copy(interrupted, tmp_path)
    partial = [p for p in ckpts.iterdir() if p.name.startswith(".ckpt-000000020.partial")]
    assert len(partial) == 1 and {p.name for p in partial[0].iterdir()} == {"dense.npz", "shard-00000-of-00001.npz"}
    assert [s for s, _ in committed_checkpoints(str(ckpts))] == [10]
    assert latest_checkpoint(str(ckpts)).endswith("ckpt-000000010")
    proc = run_gmeta(*ONE, "--data", tiny_synth, "--output-dir", tmp_path / "runs", "--checkpoint-dir", ckpts,
                     "--resume", cwd=tmp_path)
    steps = _final_meta(uninterrupted["ckpts"])["position"]["steps_per_epoch"]
    assert f"resumed from {ckpts / 'ckpt-000000010'}: epoch 0 after step 10/{steps}" in proc.stderr
    _assert_same_metrics(uninterrupted["result"], train_report(proc))
    assert _final_meta(ckpts)["history"] == _final_meta(uninterrupted["ckpts"])["history"]
    assert not [p for p in ckpts.iterdir() if ".partial" in p.name]  # the dead write was cleaned up
    every = sorted(set(range(10, steps + 1, 10)) | {steps})
    assert [s for s, _ in committed_checkpoints(str(ckpts))] == every[-3:]  # --keep-checkpoints 3
    assert (ckpts / FINISHED).exists()
    with pytest.raises(CheckpointError, match="finished all 1 epochs; nothing to resume"):
        _open(tmp_path, resume=True, checkpoint_dir=str(ckpts))


def test_resume_into_another_model_or_config_names_the_difference(interrupted, tiny_synth, tmp_path):
    ckpts = _copy(interrupted, tmp_path)
    proc = run_gmeta(*ONE, "--data", tiny_synth, "--model", "melu", "--emb-dim", "8", "--checkpoint-dir", ckpts,
                     "--resume", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "CheckpointError: cannot resume from" in proc.stderr, proc.stderr[-2000:]
    assert 'model: "maml_dnn" in the checkpoint, "melu" now' in proc.stderr
    assert "emb_dim: 16 in the checkpoint, 8 now" in proc.stderr


def test_a_corrupted_checkpoint_file_is_named(interrupted, tiny_synth, tmp_path):
    ckpts = _copy(interrupted, tmp_path)
    shard = ckpts / "ckpt-000000010" / "shard-00000-of-00001.npz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_gmeta(*ONE, "--data", tiny_synth, "--checkpoint-dir", ckpts, "--resume", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert f"checkpoint file {shard} is corrupt" in proc.stderr, proc.stderr[-2000:]


class _OneRank:
    rank, size = 0, 1


def _open(tmp_path, **flags):
    from gmeta.trainer.checkpoint.run_checkpoints import RunCheckpoints
    from gmeta.trainer.config import TrainConfig

    cfg = TrainConfig(model="maml_dnn", data="unused", epochs=1, output_dir=str(tmp_path / "runs"), **flags)
    return RunCheckpoints.open(cfg, _OneRank(), lambda m: None, schema=None)


def test_resume_without_a_checkpoint_and_a_new_run_over_old_checkpoints_are_refused(interrupted, tmp_path):
    with pytest.raises(CheckpointError, match=r"--resume: no unfinished run with a committed checkpoint under"):
        _open(tmp_path, resume=True)
    with pytest.raises(CheckpointError, match=r"--resume: no committed checkpoint in .*only unfinished writes"):
        _open(tmp_path, resume=True, checkpoint_dir=str(_partial_only(interrupted, tmp_path)))
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of another run \(newest .*ckpt-000000010"):
        _open(tmp_path, checkpoint_dir=str(interrupted / "ckpts"))


def _partial_only(interrupted, tmp_path) -> Path:
    ckpts = _copy(interrupted, tmp_path)
    shutil.rmtree(ckpts / "ckpt-000000010")
    return ckpts


def test_config_differences_ignore_operational_flags():
    saved = {"model": "melu", "emb_dim": 16, "epochs": 3, "output_dir": "a", "hidden": [64, 64]}
    now = {"model": "melu", "emb_dim": 16, "epochs": 5, "output_dir": "b", "hidden": (64, 64), "new_flag": 1}
    assert config_differences(saved, now, {"new_flag": 1}) == []
    assert config_differences(saved, dict(now, new_flag=2), {"new_flag": 1}) == [
        "new_flag: 1 in the checkpoint, 2 now"]


# ---------------------------------------------------------------------------------------- --init-from
def test_init_from_a_plain_export_starts_maml_at_the_plain_weights(uninterrupted, tiny_synth, tmp_path):
    """A MAML run --init-from a trained --meta none export starts with the plain model's dense
    parameters and tables (with --epochs 0 its export IS its initial state)."""
    plain_export = uninterrupted["export"]
    maml = run_gmeta("train", "--model", "maml_dnn", "--epochs", "0", "--init-from", plain_export, "--data", tiny_synth,
                     "--eval-splits", "user_cold", "--plain-baseline", "off", "--tracking-uri", "none",
                     "--support-curve", "none", "--output-dir", tmp_path / "maml", cwd=tmp_path)
    line = next(ln for ln in maml.stderr.splitlines() if "--init-from" in ln)
    assert "left at initial values: none" in line and "table/item_id" in line and "params/mlp/w0" in line, line
    maml_export = Path(maml.stderr.split("export: ")[-1].split()[0])
    assert json.loads((maml_export / "gmeta_model.json").read_text())["meta_config"]["meta"] == "maml"
    for name in ("dense.npz", "embeddings.npz"):
        with np.load(plain_export / name) as a, np.load(maml_export / name) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
