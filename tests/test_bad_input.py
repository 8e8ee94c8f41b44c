"""Bad input from the user's side: broken copies of a real (generated) dataset through
`gmeta train`, each stopped with one clear error that names the file, stripe or column, before
any result is written. The matrix runs `train` in this process (the command's code without its
process guard); one case runs the installed command on 2 workers (`gmeta launch`, horovodrun) to
show what a user sees: one line, exit code 1, the MLflow run FAILED."""

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pytest
from conftest import run_gmeta

from gmeta.launch import failure_line

ARGS = ["--model", "maml_dnn", "--epochs", "1", "--tasks-per-batch", "16", "--tracking-uri", "none",
        "--log-every", "0", "--no-saved-model", "--checkpoint-dir", "none", "--plain-baseline", "off",
        "--validation-split", "none", "--support-curve", "none", "--eval-splits", "user_cold"]
FILE = "part-00000.orc"


def _broken_copy(src, dst: Path, edit=None) -> Path:
    """A copy of the dataset whose training file is rewritten by ``edit(table) -> table``
    (without its index, as a user's own tool would leave it)."""
    shutil.copytree(src, dst)
    path = dst / "train" / FILE
    if edit is not None:
        table = orc.ORCFile(str(path)).read()
        orc.write_table(edit(table), str(path))
        (dst / "train" / "_index.json").unlink(missing_ok=True)
    return dst


def _column(table, name, values, type_=None):
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, pa.array(values, type_ or table.schema.field(name).type))


def _train(data, tmp_path):
    from gmeta.cli import build_parser_for
    from gmeta.trainer.config import config_from_args
    from gmeta.trainer.run.training import train

    argv = ["train", "--data", str(data), "--output-dir", str(tmp_path / "runs"), *ARGS]
    return train(config_from_args(build_parser_for(argv).parse_args(argv)))


def _negative_item(t):
    ids = t.column("item_id").to_numpy().copy()
    ids[5] = -3
    return _column(t, "item_id", ids)


def _huge_item(t):
    ids = t.column("item_id").to_numpy().copy()
    ids[7] = 10**12
    return _column(t, "item_id", ids)


def _nan_label(t):
    y = t.column("click").to_numpy().astype(np.float64)
    y[3] = np.nan
    return _column(t, "click", y, pa.float64() if t.schema.field("click").type != pa.float32() else pa.float32())


def _click_of_three(t):
    y = t.column("click").to_numpy().astype(np.float32)
    y[5] = 3.0
    return _column(t, "click", y, pa.float32())


def _split_task(t):
    """The first task's rows moved to the end: one task in two places of the file."""
    ids = t.column("task_id").to_numpy()
    first = np.flatnonzero(ids == ids[0])
    order = np.r_[first[1:], np.flatnonzero(ids != ids[0]), first[:1]]
    return t.take(pa.array(order))


CASES = {
    # name: (edit of the training file or of the directory, what the message must name)
    "truncated file": (lambda d: (d / "train" / FILE).write_bytes((d / "train" / FILE).read_bytes()[:3000]),
                       [FILE, "truncated or corrupt"]),
    "zero-byte file": (lambda d: (d / "train" / "part-00001.orc").write_bytes(b""), ["part-00001.orc", "empty file"]),
    "garbage file": (lambda d: (d / "train" / FILE).write_bytes(b"not an orc file\n" * 200),
                     [FILE, "truncated or corrupt"]),
    "dropped column": (lambda t: t.drop_columns(["item_category"]), [FILE, "'item_category'"]),
    "retyped column": (lambda t: _column(t, "item_id", t.column("item_id").to_numpy().astype(str), pa.string()),
                       [FILE, "'item_id'"]),
    "negative id": (_negative_item, [FILE, "'item_id'", "stripe"]),
    "huge id": (_huge_item, [FILE, "'item_id'", "stripe"]),
    "NaN label": (_nan_label, [FILE, "'click'", "stripe"]),
    "click of 3.0": (_click_of_three, [FILE, "'click'", "stripe", "must be in [0, 1]"]),
    "task split in the file": (_split_task, [FILE, "'task_id'"]),
    "missing schema": (lambda d: (d / "schema.json").unlink(), ["schema.json", "not found"]),
    "corrupt schema": (lambda d: (d / "schema.json").write_text('{"labels": ["click"], "sparse": [oops'),
                       ["schema.json"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_dataset_is_refused_with_a_message_that_names_the_place(case, tiny_synth, tmp_path):
    edit, named = CASES[case]
    table_edit = edit.__code__.co_varnames[:1] == ("t",)
    data = _broken_copy(tiny_synth, tmp_path / "data", edit if table_edit else None)
    if not table_edit:
        edit(data)
    with pytest.raises(ValueError) as info:  # DataError and SchemaError are ValueErrors
        _train(data, tmp_path)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    for part in named:
        assert part in message, (case, message)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("eval_results.json"))


def test_what_a_user_sees_for_bad_data_found_while_training(tiny_synth, tmp_path):
    """A NaN label is found while reading (after planning): one line from the rank that read
    it, the job ends non-zero, and the MLflow run is FAILED. Under `gmeta launch` the job's last
    line names that rank and repeats its error, where horovodrun alone would end with its own
    25-line traceback."""
    data = _broken_copy(tiny_synth, tmp_path / "data", _nan_label)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_gmeta("launch", "-np", "2", "train", "--data", data, "--output-dir", tmp_path / "runs",
                     *ARGS, "--tracking-uri", uri, cwd=tmp_path, check=False, timeout=240,
                     env={"OMP_NUM_THREADS": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1
    errors = [line for line in text.splitlines() if "ERROR DataError" in line]
    assert len(errors) == 1 and FILE in errors[0] and "'click'" in errors[0], text[-3000:]
    assert "Traceback (most recent call last)" not in text, text[-3000:]
    rank, said = re.match(r"\[(\d+)\]<stderr>:\[gmeta rank \d+\] ERROR (.*)$", errors[0]).groups()
    assert proc.stderr.strip().splitlines()[-1] == f"gmeta launch: rank {rank} failed first (exit status 1): {said}"
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gmeta").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.params["model"] == "maml_dnn"


@pytest.mark.parametrize("flag", ["--output-dir", "--checkpoint-dir", "--results-json"])
def test_an_unwritable_path_is_refused_before_any_work(flag, tiny_synth, tmp_path):
    from gmeta.cli import build_parser_for
    from gmeta.trainer.config import config_from_args
    from gmeta.trainer.run.training import train

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "sub" / ("r.json" if flag == "--results-json" else "")
    argv = ["train", "--data", str(tiny_synth), "--output-dir", str(tmp_path / "runs"), *ARGS, flag, str(bad)]
    with pytest.raises(ValueError, match=f"{flag} {blocker}/sub.*not writable"):
        train(config_from_args(build_parser_for(argv).parse_args(argv)))


class _Planted:
    """Unpickling this would create a file: the evidence that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_checkpoint_file_holding_pickled_code_is_refused_not_run(tmp_path):
    import hashlib

    from gmeta.trainer.checkpoint.files import CheckpointError, load_npz

    evidence = tmp_path / "code-ran"
    path = tmp_path / "dense.npz"
    np.savez(path, w=np.array([_Planted(str(evidence))], dtype=object))
    data = path.read_bytes()
    manifest = {"files": {"dense.npz": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}
    with pytest.raises(CheckpointError, match=r"dense.npz cannot be decoded: ValueError: .*allow_pickle=False"):
        load_npz(str(path), manifest)
    assert not evidence.exists()


def test_bad_data_in_an_evaluation_split_is_named_too(tiny_synth, tmp_path):
    """Evaluation reads its splits after training: a NaN label there is the same one-line
    DataError, not a tf.data error."""
    from gmeta.io.errors import DataError

    data = _broken_copy(tiny_synth, tmp_path / "data")
    path = data / "user_cold" / FILE
    orc.write_table(_nan_label(orc.ORCFile(str(path)).read()), str(path))
    (data / "user_cold" / "_index.json").unlink(missing_ok=True)
    with pytest.raises(DataError) as info:
        _train(data, tmp_path)
    assert f"user_cold/{FILE}" in str(info.value) and "'click'" in str(info.value)


def test_launch_shows_any_other_horovodrun_failure_in_full():
    """Only horovodrun's "a worker exited non-zero" traceback is replaced; its other failures
    (ssh, a bad -H) keep their traceback, and a rank that printed no error is pointed at."""
    other = ["Traceback (most recent call last):\n", '  File "launch.py", line 655, in _run_static\n',
             "RuntimeError: could not connect to some hosts via ssh\n"]
    assert failure_line(other, {}) == ""
    worker = other[:2] + ["RuntimeError: Horovod detected that one or more processes exited with non-zero status, "
                          "thus causing the job to be terminated. The first process to do so was:\n",
                          "Process name: 1\n", "Exit code: 137\n"]
    assert failure_line(worker, {"0": "DataError: x"}) == \
        "gmeta launch: rank 1 failed first (exit status 137): its output is above\n"
