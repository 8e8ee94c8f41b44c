"""Cold-start evaluation: per-task metrics of query scores before and after adapting on each
task's support set, next to honest baselines, with 95% bootstrap intervals over tasks.

Every rank evaluates its shard of each split; the per-row outputs are gathered once per split
(the same collective on every rank) and every rank computes the same report with
``gmeta.trainer.evaluation.metrics`` (the one implementation of the metrics). Per split and for the
headline score of the model (and each extra head, e.g. MAML-ESMM's pCTCVR), the report holds:

* ``adapted`` / ``unadapted``: the model after / before the inner loop on the support set;
* ``oracle``: the generator's true probability, when the dataset carries it;
* baselines on the same query rows: ``constant`` (chance by the tie rule), ``item_mean`` (the
  smoothed training mean of the item's label: popularity for clicks, mean rating for ratings),
  ``item_knn`` (cosine item-item similarity over the training split's positives, summed over the
  task's support positives: the support rows the model adapts on), and, when a plain network is given, ``plain`` (the same network trained without meta-learning)
  and ``plain_finetuned`` (that network after the same inner loop on the support set);
* ``differences``: the adapted model minus each baseline in GAUC, nDCG@5 and nDCG@10, with a paired
  bootstrap interval and whether it excludes 0.

Flat headline keys (``gauc_adapted``, ``auc_adapted`` = pooled AUC, ...) sit next to the nested
metrics so dashboards and tuning read one number.
"""

from __future__ import annotations

import math
import time

import numpy as np

from gmeta.io.plan import read_columns
from gmeta.io.reader import MetaReader
from gmeta.trainer.evaluation import metrics
from gmeta.trainer.evaluation.baselines import ItemKNNBaseline, ItemMeanBaseline
from gmeta.trainer.evaluation.rows import (
    SCORES,
    heads_of,
    is_score_key,
    label_key,
    oracle_key,
    plain_key,
    plain_of,
    score_key,
)

ORACLE_FOR = {"auc": "p_click", "auc_ctcvr": "p_ctcvr"}
COMPARED = ("gauc", "ndcg@5", "ndcg@10")
FLAT = ("gauc", "ndcg@5", "mrr")


def evaluation_splits(schema, requested=None) -> list:
    # by default every split but train and val (val chooses hyper-parameters; it is not a result)
    splits = [s for s in schema.splits if s not in ("train", "val")] if not requested else list(requested)
    unknown = [s for s in splits if s not in schema.splits]
    if unknown:
        raise ValueError(f"--eval-splits {unknown} not in the dataset's splits {list(schema.splits)}")
    return splits


def item_baselines(dataset_dir: str, model) -> dict:
    """The item baselines fitted on every training row: ``{"item_mean": ItemMeanBaseline,
    "item_knn": ItemKNNBaseline}``, empty when the schema names no single-valued item feature."""
    schema = model.schema
    item = schema.item_id_feature
    if item is None or schema.feature(item).is_list:
        return {}
    label = "rating" if model.target == "rating" else model.target
    cols = read_columns(dataset_dir, "train", sorted({schema.task_column, item, label}))
    relevant = np.asarray(model.relevance(cols))
    fitted = {"item_mean": ItemMeanBaseline.fit(cols[item], cols[label])}
    if relevant.any():
        fitted["item_knn"] = ItemKNNBaseline.fit(cols[schema.task_column], cols[item], relevant)
    return fitted


def evaluate_splits(learner, dataset_dir: str, splits, comm, reader_kwargs: dict, inner_steps: int,
                    log=print, plain=None, baselines=None, n_boot: int = 1000, rows_out=None,
                    unseen_past=None) -> tuple:
    """``(report, per_task)``: the JSON-able report per split (module docstring) and the per-task
    arrays behind it (``{split: {"<head>/<scorer>": per-task dict}}``) for paired comparisons.

    ``plain``: a learner of the same network trained with ``meta="none"`` (or None).
    ``baselines``: fitted item baselines from ``item_baselines`` (or None).
    ``rows_out``: a dict that receives, per split, the gathered per-query-row arrays (for
    ``gmeta evaluate --predictions-out``, so the rows are not computed twice).
    ``unseen_past``: ``{feature: rows}``: the model sees ids >= rows as the out-of-vocabulary row 0
    (a dataset whose vocabularies grew since the model was trained; the baselines keep the ids).
    """
    report, per_task = {}, {}
    for split in splits:
        t0 = time.time()
        reader = MetaReader(dataset_dir, split=split, rank=comm.rank, world_size=comm.size,
                            shuffle=False, seed=0, **reader_kwargs)
        rows, support = _collect(learner, plain, reader, inner_steps, learner.model.schema.oracle, unseen_past or {})
        gathered = comm.allgather_object((rows, support, reader.stats.get("tasks_read", 0)))
        merged, support = (_concat([g[k] for g in gathered if g[k]]) for k in (0, 1))
        tasks = int(sum(g[2] for g in gathered))
        if rows_out is not None:
            rows_out[split] = merged
        report[split], per_task[split] = _split_report(merged, support, learner.model, baselines or {}, n_boot)
        report[split]["tasks"] = tasks
        log(f"evaluated {split}: {report[split]['rows']} query rows of {tasks} tasks in "
            f"{time.time() - t0:.1f} s")
    return report, per_task


def _concat(parts: list) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def _unseen_to_oov(batch: dict, unseen_past: dict) -> dict:
    """The batch with ids >= ``unseen_past[feature]`` set to the out-of-vocabulary row 0 (list
    padding, -1, stays)."""
    if not unseen_past:
        return batch
    out = dict(batch)
    for part in ("support", "query"):
        out[part] = {k: np.where(v.numpy() >= unseen_past[k], 0, v.numpy()) if k in unseen_past else v
                     for k, v in batch[part].items()}
    return out


def _collect(learner, plain, reader, inner_steps: int, oracle_columns, unseen_past: dict) -> tuple:
    """This rank's real query rows of one split (the model's and the plain network's scores,
    labels, task and item ids, oracle columns) and its real support positives (task, item: what
    the item-kNN baseline scores from)."""
    ds = reader.dataset(epoch=0)
    fn = learner.compiled_eval_step(ds.element_spec, inner_steps)
    plain_fn = plain.compiled_eval_step(ds.element_spec, inner_steps) if plain is not None else None
    model = learner.model
    item = model.schema.item_id_feature
    single_item = item is not None and not model.schema.feature(item).is_list
    chunks, supports = [], []
    for batch in reader.surfacing_errors(ds):
        if single_item:
            s = batch["support"]
            liked = ((s["mask"].numpy() > 0) & (batch["task_mask"].numpy()[:, None] > 0)
                     & (np.asarray(model.relevance(s)) > 0.5))
            supports.append({"task": np.broadcast_to(batch["task_id"].numpy()[:, None], liked.shape)[liked],
                             "item": s[item].numpy()[liked]})
        seen = _unseen_to_oov(batch, unseen_past)
        out = fn(seen)
        keep = out.pop("mask").numpy() > 0
        row = {k: v.numpy()[keep] for k, v in out.items()}
        if "item" in row:          # the baselines score the dataset's own item ids
            row["item"] = batch["query"][item].numpy()[keep]
        row["query_position"] = np.broadcast_to(np.arange(keep.shape[1]), keep.shape)[keep]
        if plain_fn is not None:
            p = plain_fn(seen)
            for k, v in p.items():
                if is_score_key(k):
                    row[plain_of(k)] = v.numpy()[keep]
        for oracle in oracle_columns:
            row[oracle_key(oracle)] = batch["query"][oracle].numpy()[keep]
        chunks.append(row)
    return _concat(chunks), _concat(supports)


def _split_report(merged: dict, support: dict, model, baselines: dict, n_boot: int) -> tuple:
    heads = heads_of(merged)
    report = {"rows": int(merged["task"].size) if merged else 0}
    per_task = {}
    if not merged:
        return report, per_task
    task = merged["task"]
    is_rating = model.target == "rating"
    for h, head in enumerate(heads):
        label = merged[label_key(head)]
        ratings = merged.get("rating") if is_rating and h == 0 else None
        probabilities = not (is_rating and h == 0)
        scorers = {s: merged[score_key(head, s)] for s in SCORES}
        oracle = ORACLE_FOR.get(head)
        if oracle and oracle_key(oracle) in merged:
            scorers["oracle"] = merged[oracle_key(oracle)]
        if h == 0:
            scorers["constant"] = np.full(label.shape, 0.5)
            if "item_mean" in baselines and "item" in merged:
                scorers["item_mean"] = baselines["item_mean"].scores(merged["item"])
            if "item_knn" in baselines and "item" in merged:
                s_task, s_item = (support.get(k, np.zeros(0, np.int64)) for k in ("task", "item"))
                scorers["item_knn"] = baselines["item_knn"].scores(task, merged["item"], s_task, s_item)
            if plain_key(head, "adapted") in merged:
                scorers["plain"] = merged[plain_key(head, "unadapted")]
                scorers["plain_finetuned"] = merged[plain_key(head, "adapted")]
        section = {}
        for name, scores in scorers.items():
            # the oracle and the constant are probabilities even for a rating model's labels;
            # item-kNN scores are neither probabilities nor ratings (ranking metrics only)
            probs = (probabilities or name in ("oracle", "constant")) and name != "item_knn"
            rates = ratings if name not in ("oracle", "constant", "item_knn") else None
            summary, per_task[score_key(head, name)] = metrics.evaluate_scores(
                task, scores, label, ratings=rates, probabilities=probs and rates is None,
                n_boot=n_boot, return_per_task=True)
            section[name] = _clean(summary)
        section["differences"] = {
            other: {m: _clean(metrics.paired_difference(per_task[score_key(head, "adapted")],
                                                        per_task[score_key(head, other)], m, n_boot=n_boot))
                    for m in COMPARED}
            for other in section if other not in ("adapted",)}
        report[head] = section
        # flat keys: the pooled AUC under its historical names, per-task headline metrics
        for name in ("adapted", "unadapted", "oracle"):
            if name in section:
                report[f"{head}_{name}"] = section[name]["pooled_auc"]["value"]
        if h == 0:
            for m in FLAT:
                for name in ("adapted", "unadapted"):
                    report[f"{m}_{name}"] = section[name][m]["value"]
    return report, per_task


def _clean(obj):
    """Round floats, NaN -> None (valid JSON), recursively."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else round(float(obj), 5)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
