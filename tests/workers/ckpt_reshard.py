"""Worker: a checkpoint written by N workers loads on M, rows and optimizer slots included.

``save DATA CKPT_DIR REF``: give every variable of the model and of the plain baseline alongside
distinct values (``randomize``: lazy Adam rows, so every row carries two slots), write one
checkpoint, and (rank 0) the whole gathered state to REF.

``load DATA CKPT_DIR:REF:OUT ... [--naive=CKPT_DIR:REF:OUT] [--init=CKPT_DIR:REF:OUT]
[--save=SAVE_DIR:SAVE_REF]``:
for each ``CKPT_DIR:REF:OUT``, restore the newest checkpoint of CKPT_DIR on this world size,
gather the whole state again and (rank 0) write to OUT the names compared and every one whose
value differs from REF (``--naive``: into replicated tables); ``--init`` starts fresh learners
from a checkpoint's weights (``--init-from``) and compares the model's parameters and tables;
``--save`` randomizes again and saves on this world size. Runs under horovodrun, or as a plain process (one worker).
"""
import json
import sys

import numpy as np
from _guard import guard

from gmeta.io.schema import Schema
from gmeta.trainer.checkpoint.assemble import restore_checkpoint
from gmeta.trainer.checkpoint.files import latest_checkpoint
from gmeta.trainer.checkpoint.init_from import init_from
from gmeta.trainer.checkpoint.save import save_checkpoint
from gmeta.trainer.config import TrainConfig
from gmeta.trainer.meta.state import run_state
from gmeta.trainer.parallel.comm import init_communicator
from gmeta.trainer.run.build import build_learner


def _config(data, parallel="hybrid"):
    # hybrid: the feature tables of at most 2 KB replicated, the user and item tables sharded (a
    # mixed plan: both placements are written and re-sharded)
    return TrainConfig(model="maml_dnn", data=data, meta_sgd=True, emb_optimizer="adam",
                       parallel=parallel, tracking_uri=None, seed=3, replicate_tables="2k")


def _learners(cfg, comm):
    schema = Schema.load(cfg.data)
    return {"model": build_learner(cfg, schema, comm, "maml"),
            "plain": build_learner(cfg, schema, comm.with_own_counters(), "none")}


def randomize(learners, seed: int) -> None:
    """Give every state variable distinct values, the same on every world size: a row's value is
    a function of (seed, name, global row), counters become seed-dependent integers."""
    for prefix, learner in learners.items():
        state = run_state(learner)
        emb = learner.embedding
        for name, var in {**state.replicated, **state.sharded}.items():
            rng = np.random.default_rng([seed, sum(map(ord, f"{prefix}/{name}"))])
            if var.dtype.is_integer:
                var.assign(np.asarray(seed * 10 + 7, var.dtype.as_numpy_dtype))
            elif name.startswith("table/"):
                table = name.split("/")[1]
                full = rng.standard_normal((emb.plan.table(table).num_rows,) + tuple(var.shape[1:]))
                var.assign(full[emb.state_rows(table)].astype(np.float32))
            else:
                var.assign(rng.standard_normal(var.shape).astype(np.float32))


def full_state(learners, comm) -> dict:
    """Every state variable of every learner, whole: tables and their slots gathered by global row."""
    out = {}
    for prefix, learner in learners.items():
        state = run_state(learner)
        emb = learner.embedding
        for name, var in state.replicated.items():
            out[f"{prefix}/{name}"] = var.numpy()
        for name, var in state.sharded.items():
            table = name.split("/")[1] if name.startswith("table/") else None
            if table is None:
                out[f"{prefix}/{name}"] = var.numpy()
                continue
            parts = comm.allgather_object((emb.state_rows(table), var.numpy()))
            n = emb.plan.table(table).num_rows
            full = np.full((n,) + tuple(var.shape[1:]), np.nan, np.float32)
            for rows, values in parts:
                full[rows] = values
            out[f"{prefix}/{name}"] = full
    return out


def main(action, data, *args):
    comm = init_communicator("auto")
    cfg = _config(data, "hybrid")
    learners = _learners(cfg, comm)
    if action == "save":
        ckpt_dir, ref = args[0], args[1]
        randomize(learners, seed=1)
        save_checkpoint(ckpt_dir, 3, learners, comm, {"note": "ckpt_reshard worker"})
        state = full_state(learners, comm)
        if comm.rank == 0:
            np.savez(ref, **state)
        return
    specs = [(learners, a) for a in args if not a.startswith("--")]  # CKPT_DIR:REF:OUT, in turn
    naive = [a[len("--naive="):] for a in args if a.startswith("--naive=")]
    if naive:  # the same into replicated tables
        specs += [(_learners(_config(data, "naive"), comm), a) for a in naive]
    for into, spec in specs:
        ckpt_dir, ref, out = spec.split(":")
        path = latest_checkpoint(ckpt_dir)
        meta = restore_checkpoint(path, into, comm)
        state = full_state(into, comm)
        if comm.rank == 0:
            with np.load(ref) as want:
                names = sorted(set(want.files) | set(state))
                bad = [n for n in names if n not in want.files or n not in state
                       or not np.array_equal(want[n], state[n])]
            json.dump({"checkpoint": path, "written_by": meta["world_size"], "loaded_on": comm.size,
                       "names": names, "mismatches": bad,
                       "replicated": list(into["model"].embedding.plan.replicated)}, open(out, "w"))
    for spec in [a for a in args if a.startswith("--init=")]:  # --init-from a checkpoint: weights only
        ckpt_dir, ref, out = spec[len("--init="):].split(":")
        fresh = _learners(cfg, comm)
        report = init_from(ckpt_dir, fresh, None, lambda m: None)
        state = full_state(fresh, comm)
        if comm.rank == 0:
            with np.load(ref) as want:
                names = sorted(n for n in state if n.startswith("model/") and "optimizer" not in n
                               and not n.endswith(("/m", "/v")))
                bad = [n for n in names if not np.array_equal(want[n], state[n])]
            json.dump({"names": names, "mismatches": bad, "report": report}, open(out, "w"))
    for spec in [a for a in args if a.startswith("--save=")]:  # train one more step, save again
        save_dir, save_ref = spec[len("--save="):].split(":")
        randomize(learners, seed=2)
        save_checkpoint(save_dir, 4, learners, comm, {"note": "ckpt_reshard worker"})
        state = full_state(learners, comm)
        if comm.rank == 0:
            np.savez(save_ref, **state)


guard(main, *sys.argv[1:])
