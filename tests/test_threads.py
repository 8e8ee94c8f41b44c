"""Workers that share a host split its cores: ``gmeta`` sets TensorFlow's thread pools from the
worker count horovodrun puts in each worker's environment, before TensorFlow starts; one worker,
or a user who set either variable, keeps TensorFlow's own. A real horovodrun job shows what its
workers' TensorFlow will read. (The speed this buys is measured by ``gmeta bench movielens``,
see ``worker_threads``.)"""

import json
import os

from conftest import BIN, horovodrun

from gmeta.cli import main as gmeta
from gmeta.trainer.parallel.launch import worker_threads

#: a worker's gmeta start-up, then what TensorFlow's runtime will read (TF_NUM_*_THREADS are read
#: when its thread pools start: tensorflow/core/common_runtime/process_util.cc)
PROBE = ("import json, os; from gmeta.cli import main; main(['--version']); "
         "print('THREADS', json.dumps([os.environ.get('TF_NUM_INTRAOP_THREADS'), "
         "os.environ.get('TF_NUM_INTEROP_THREADS'), os.environ['HOROVOD_RANK']]))")


def test_the_rule():
    assert worker_threads({"HOROVOD_LOCAL_SIZE": "2"}, 2) == {"TF_NUM_INTRAOP_THREADS": "1",
                                                            "TF_NUM_INTEROP_THREADS": "1"}
    assert worker_threads({"HOROVOD_LOCAL_SIZE": "4"}, 16) == {"TF_NUM_INTRAOP_THREADS": "4",
                                                             "TF_NUM_INTEROP_THREADS": "1"}
    assert worker_threads({"HOROVOD_LOCAL_SIZE": "3"}, 2)["TF_NUM_INTRAOP_THREADS"] == "1"
    assert worker_threads({"HOROVOD_LOCAL_SIZE": "1"}, 2) == {}
    assert worker_threads({}, 2) == {}
    assert worker_threads({"HOROVOD_LOCAL_SIZE": "2", "TF_NUM_INTRAOP_THREADS": "2"}, 2) == {}


def test_gmeta_sets_them_before_tensorflow_starts(monkeypatch, capsys):
    for k in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOROVOD_LOCAL_SIZE", "2")
    assert gmeta(["--version"]) == 0
    assert os.environ["TF_NUM_INTRAOP_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert os.environ["TF_NUM_INTEROP_THREADS"] == "1"


def test_two_workers_on_one_host_each_get_their_share(monkeypatch):
    for k in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):   # (conftest sets them for the tests)
        monkeypatch.delenv(k, raising=False)
    proc = horovodrun(2, [BIN / "python", "-c", PROBE], timeout=120)
    seen = sorted(json.loads(line.split("THREADS ", 1)[1]) for line in proc.stdout.splitlines() if "THREADS " in line)
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert seen == [[share, "1", "0"], [share, "1", "1"]], proc.stdout
