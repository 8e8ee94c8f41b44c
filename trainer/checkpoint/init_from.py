"""``--init-from``: start a new run from trained weights, an export's or a checkpoint's.

Every model variable and table whose name (and shape) exists in both the source and the learner
is copied; the rest keep their initial values and the optimizers' state stays fresh, so a
changed model or config still starts from whatever fits.
"""

from __future__ import annotations

import json
import os

import numpy as np

from gmeta.io import fs
from gmeta.trainer.checkpoint.assemble import assemble_rows
from gmeta.trainer.checkpoint.files import (
    DENSE,
    is_checkpoint,
    is_dir,
    latest_checkpoint,
    load_npz,
    read_checkpoint_meta,
)
from gmeta.trainer.meta.state import OPTIMIZER_PREFIXES, run_state
from gmeta.trainer.serving.export import EXPORT_FILE
from gmeta.trainer.tracking.mlflow_run import resolve_export_dir


class _WeightSource:
    """Trained weights by name: an export directory or a checkpoint."""

    def __init__(self, source: str, tracking_uri):
        self.source = source
        self.checkpoint = None
        if is_checkpoint(source):
            self.checkpoint = source
        elif is_dir(source) and latest_checkpoint(source):
            self.checkpoint = latest_checkpoint(source)
        elif is_dir(source) and latest_checkpoint(fs.join(source, "checkpoints")):
            self.checkpoint = latest_checkpoint(fs.join(source, "checkpoints"))
        if self.checkpoint is not None:
            self.kind, self.where = "checkpoint", self.checkpoint
            self.manifest, self.meta = read_checkpoint_meta(self.checkpoint)
            dense = load_npz(fs.join(self.checkpoint, DENSE), self.manifest)
            self.values = {k[len("model/"):]: v for k, v in dense.items() if k.startswith("model/")}
            self.tables = {name: tuple(shape) for name, shape in self.meta.get("tables", {}).items()}
            return

        self.kind, self.where = "export", resolve_export_dir(source, tracking_uri)
        with np.load(os.path.join(self.where, "dense.npz"), allow_pickle=False) as z:
            self.values = {k: z[k] for k in z.files}
        with open(os.path.join(self.where, EXPORT_FILE)) as f:
            self.tables = {n: tuple(s) for n, s in json.load(f).get("tables", {}).items()}
        self._embeddings = None

    def table_rows(self, table: str, rows: np.ndarray, plan) -> np.ndarray:
        if self.kind == "export":
            if self._embeddings is None:
                with np.load(os.path.join(self.where, "embeddings.npz"), allow_pickle=False) as z:
                    self._embeddings = {k: z[k] for k in z.files}
            return self._embeddings[table][rows]
        name = f"table/{table}"
        got = assemble_rows(self.checkpoint, self.manifest, self.meta,
                            {("model", table): (rows, {name: ((rows.size, plan.table(table).dim), np.float32)},
                                                plan)})
        return got[("model", f"table/{table}")]


def init_from(source: str, learners: dict, tracking_uri, log) -> dict:
    """Copy every model variable and table whose name (and shape) exists in both ``source`` and
    each learner; optimizer state stays fresh. Returns ``{learner: {"loaded": [...], "left":
    [...]}}`` and logs which names were loaded and which kept their initial values."""
    src = _WeightSource(source, tracking_uri)
    report = {}
    for prefix, learner in learners.items():
        state = run_state(learner)
        loaded, left = [], []
        for name, var in sorted(state.model_variables().items()):
            value = src.values.get(name)
            if value is not None and tuple(value.shape) == tuple(var.shape):
                var.assign(value)
                loaded.append(name)
            else:
                left.append(name if value is None else f"{name} (shape {list(value.shape)} there, "
                                                         f"{var.shape.as_list()} here)")
        emb = learner.embedding
        for t in emb.plan.tables:
            name = f"table/{t.name}"
            shape = src.tables.get(t.name)
            if shape is not None and tuple(shape) == (t.num_rows, t.dim):
                rows = np.asarray(emb.state_rows(t.name), dtype=np.int64)
                emb.state_variables()[name].assign(src.table_rows(t.name, rows, emb.plan))
                loaded.append(name)
            else:
                left.append(name if shape is None else f"{name} (shape {list(shape)} there, "
                                                         f"{[t.num_rows, t.dim]} here)")
        emb.after_load()
        unused = sorted(n for n in set(src.values) - set(state.model_variables())
                        if not n.startswith(OPTIMIZER_PREFIXES))
        report[prefix] = {"loaded": loaded, "left": left}
        who = "model" if prefix == "model" else "plain baseline (trained alongside)"
        log(f"--init-from {source} ({src.kind} {src.where}) into the {who}: loaded {len(loaded)} "
            f"[{', '.join(loaded)}]; left at initial values: {', '.join(left) or 'none'}"
            + (f"; not in this model: {', '.join(unused)}" if unused else ""))
    return report
