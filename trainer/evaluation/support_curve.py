"""GAUC against the number of support rows a new user gives: the cold-start curve.

Meta-learning's claim is about the first few interactions, so the report shows what each
model does with 0, 1, 2, 5, ... support rows per task (the first k rows of each task's support
set, in file order; ``all``: the whole support set up to the cap S). The adapted model and the
fine-tuned plain network adapt on those k rows; the unadapted model ignores them (a flat line).
Each batch is read once and scored for every k with the same traced eval function (only the
support mask changes, so nothing retraces).
"""

from __future__ import annotations

import numpy as np

from gmeta.io.reader import MetaReader
from gmeta.trainer.evaluation import metrics
from gmeta.trainer.evaluation.rows import heads_of, label_key, score_key

DEFAULT_POINTS = "0,1,2,5,10,20,all"


def parse_points(text: str) -> tuple:
    """``"0,1,2,all"`` -> ``(0, 1, 2, "all")``; ``"none"`` or "" -> ``()``. Raises naming the flag."""
    if not text or text.strip().lower() == "none":
        return ()
    points = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            points.append("all")
            continue
        try:
            k = int(part)
        except ValueError:
            raise ValueError(f"--support-curve expects comma separated row counts or 'all', got {part!r}") from None
        if k < 0:
            raise ValueError(f"--support-curve: {k} support rows is negative")
        points.append(k)
    return tuple(dict.fromkeys(points))


def _limited(batch: dict, k) -> dict:
    """The batch with each task's support mask cut to its first ``k`` real rows."""
    import tensorflow as tf

    if k == "all":
        return batch
    mask = batch["support"]["mask"]
    keep = tf.cast(tf.cumsum(mask, axis=1) <= float(k), mask.dtype)
    return {**batch, "support": {**batch["support"], "mask": mask * keep}}


def support_curve(learner, plain, dataset_dir: str, splits, comm, reader_kwargs: dict, inner_steps: int,
                  points, log=print) -> dict:
    """``{split: {"k": [...], "adapted": [gauc...], "unadapted": [...], "plain_finetuned": [...],
    "plain": [...]}}`` for the model's headline score; every rank returns the same."""
    model = learner.model
    out = {}
    for split in splits:
        reader = MetaReader(dataset_dir, split=split, rank=comm.rank, world_size=comm.size, shuffle=False,
                            seed=0, **reader_kwargs)
        ds = reader.dataset(epoch=0)
        fn = learner.compiled_eval_step(ds.element_spec, inner_steps)
        plain_fn = plain.compiled_eval_step(ds.element_spec, inner_steps) if plain is not None else None
        head = None
        rows = {k: {"adapted": [], "plain_finetuned": []} for k in points}
        common = {"task": [], "label": [], "unadapted": [], "plain": [], "rating": []}
        for batch in reader.surfacing_errors(ds):
            for i, k in enumerate(points):
                limited = _limited(batch, k)
                scored = fn(limited)
                plain_scored = plain_fn(limited) if plain_fn is not None else None
                if head is None:
                    head = heads_of(scored)[0]
                keep = scored["mask"].numpy() > 0
                rows[k]["adapted"].append(scored[score_key(head, "adapted")].numpy()[keep])
                if plain_scored is not None:
                    rows[k]["plain_finetuned"].append(plain_scored[score_key(head, "adapted")].numpy()[keep])
                if i == 0:  # what does not depend on k
                    common["task"].append(scored["task"].numpy()[keep])
                    common["label"].append(scored[label_key(head)].numpy()[keep])
                    common["unadapted"].append(scored[score_key(head, "unadapted")].numpy()[keep])
                    if "rating" in scored:
                        common["rating"].append(scored["rating"].numpy()[keep])
                    if plain_scored is not None:
                        common["plain"].append(plain_scored[score_key(head, "unadapted")].numpy()[keep])
        mine = {"common": _cat(common), "by_k": {k: _cat(v) for k, v in rows.items()}}
        gathered = [g for g in comm.allgather_object(mine) if g["common"].get("task", np.zeros(0)).size]
        if not gathered:
            continue
        task = np.concatenate([g["common"]["task"] for g in gathered])
        label = np.concatenate([g["common"]["label"] for g in gathered])
        is_rating = model.target == "rating"
        ratings = np.concatenate([g["common"]["rating"] for g in gathered]) if is_rating and \
            gathered[0]["common"].get("rating", np.zeros(0)).size else None

        def gauc(scores):
            summary = metrics.evaluate_scores(task, scores, label, ratings=ratings,
                                              probabilities=ratings is None and not is_rating, n_boot=0)
            value = summary["gauc"]["value"]
            return None if value is None or np.isnan(value) else round(float(value), 5)

        unadapted = gauc(np.concatenate([g["common"]["unadapted"] for g in gathered]))
        c = {"k": list(points), "adapted": [], "unadapted": [unadapted] * len(points)}
        if plain_fn is not None:
            plain_value = gauc(np.concatenate([g["common"]["plain"] for g in gathered]))
            c["plain"], c["plain_finetuned"] = [plain_value] * len(points), []
        for k in points:
            c["adapted"].append(gauc(np.concatenate([g["by_k"][k]["adapted"] for g in gathered])))
            if plain_fn is not None:
                c["plain_finetuned"].append(gauc(np.concatenate([g["by_k"][k]["plain_finetuned"] for g in gathered])))
        out[split] = c
        log(f"support curve {split}: GAUC adapted " + ", ".join(f"k={k}: {v}" for k, v in zip(points, c["adapted"])))
    return out


def _cat(lists: dict) -> dict:
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in lists.items()}
