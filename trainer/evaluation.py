"""Cold-start evaluation: query AUC before and after adapting on each task's support set.

Every rank evaluates its shard of each split; predictions are gathered once per split (the same
collective on every rank) and the AUC is pooled over all query rows of all real tasks.
"""

from __future__ import annotations

import math
import time

import numpy as np

from gmeta.trainer.metrics import auc

ORACLE_FOR = {"auc": "p_click", "auc_ctcvr": "p_ctcvr"}


def evaluation_splits(schema, requested=None) -> list:
    splits = [s for s in schema.splits if s != "train"] if not requested else list(requested)
    unknown = [s for s in splits if s not in schema.splits]
    if unknown:
        raise ValueError(f"--eval-splits {unknown} not in the dataset's splits {list(schema.splits)}")
    return splits


def evaluate_splits(learner, dataset_dir: str, splits, comm, reader_kwargs: dict, inner_steps: int,
                    log=print) -> dict:
    from gmeta.io.reader import MetaReader

    schema = learner.model.schema
    results = {}
    for split in splits:
        t0 = time.time()
        reader = MetaReader(dataset_dir, split=split, rank=comm.rank, world_size=comm.size,
                            shuffle=False, seed=0, **reader_kwargs)
        ds = reader.dataset(epoch=0)
        fn = learner.compiled_eval_step(ds.element_spec, inner_steps)
        chunks = []
        for batch in ds:
            out = fn(batch)
            keep = out.pop("mask").numpy() > 0
            row = {k: v.numpy()[keep] for k, v in out.items()}
            for oracle in schema.oracle:
                row[f"oracle/{oracle}"] = batch["query"][oracle].numpy()[keep]
            chunks.append(row)
        local = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
        gathered = [g for g in comm.allgather_object(local) if g]
        merged = {k: np.concatenate([g[k] for g in gathered]) for k in gathered[0]} if gathered else {}
        results[split] = _split_metrics(merged, schema)
        results[split]["tasks"] = int(sum(comm.allgather_object(reader.stats.get("tasks_read", 0))))
        log(f"evaluated {split}: {results[split]['rows']} query rows in {time.time() - t0:.1f} s")
    return results


def _split_metrics(merged: dict, schema) -> dict:
    out = {}
    names = sorted({k.split("/")[0] for k in merged if not k.startswith("oracle/")})
    for name in names:
        label = merged[f"{name}/label"]
        out[f"{name}_adapted"] = _round(auc(merged[f"{name}/adapted"], label))
        out[f"{name}_unadapted"] = _round(auc(merged[f"{name}/unadapted"], label))
        oracle = ORACLE_FOR.get(name)
        if oracle and f"oracle/{oracle}" in merged:
            out[f"{name}_oracle"] = _round(auc(merged[f"oracle/{oracle}"], label))
    first = next(iter(merged.values()), np.zeros(0))
    out["rows"] = int(first.shape[0])
    return out


def _round(x: float):
    return None if x is None or math.isnan(x) else round(float(x), 5)
