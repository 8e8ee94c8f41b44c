"""The evaluation report as people read it: one table per split and head, and the per-task
arrays saved next to the run so ``gmeta compare`` can test differences between runs."""

from __future__ import annotations

import os

import numpy as np

ROWS = ("adapted", "unadapted", "plain_finetuned", "plain", "item_mean", "item_knn", "constant", "oracle")
LABELS = {"adapted": "model, adapted", "unadapted": "model, unadapted",
          "plain_finetuned": "plain, fine-tuned", "plain": "plain", "item_mean": "item mean",
          "item_knn": "item-kNN", "constant": "constant", "oracle": "oracle"}
COLUMNS = ("gauc", "ndcg@5", "ndcg@10", "mrr", "logloss", "rmse", "pooled_auc")
#: the scorers and metrics of the headline (the last stdout line, the MLflow metrics): metric -> key prefix
HEADLINE_SCORERS = ("adapted", "unadapted", "plain", "plain_finetuned", "item_mean", "item_knn")
HEADLINE_METRICS = {"gauc": "gauc", "ndcg@10": "ndcg10"}
#: headline keys that are counts, not metrics (printed, not logged to MLflow)
HEADLINE_COUNTS = ("tasks", "rows")


def _cell(m) -> str:
    if not m or m.get("value") is None:
        return "-"
    if m.get("lo") is None:
        return f"{m['value']:.4f}"
    return f"{m['value']:.4f} [{m['lo']:.3f},{m['hi']:.3f}]"


def format_report(results: dict) -> str:
    """Per split and head: every scorer's per-task metrics with 95% intervals over tasks, then
    which differences from the adapted model are significant."""
    lines = []
    for split, res in results.items():
        for head, section in res.items():
            if head == "support_curve":
                lines.extend(_curve_lines(split, section))
                continue
            if not isinstance(section, dict) or not isinstance(section.get("adapted"), dict):
                continue
            columns = [c for c in COLUMNS if any(c in section.get(r, {}) for r in ROWS)]
            lines.append(f"\n{split} / {head}: {res['rows']} query rows, {res.get('tasks', '?')} tasks "
                         f"(95% bootstrap intervals over tasks)")
            lines.append(f"  {'scorer':<18}" + "".join(f"{c:>24}" for c in columns))
            for row in ROWS:
                if row in section:
                    lines.append(f"  {LABELS[row]:<18}" + "".join(f"{_cell(section[row].get(c)):>24}"
                                                                   for c in columns))
            for other, diffs in section.get("differences", {}).items():
                parts = []
                for metric, d in diffs.items():
                    if d.get("diff") is None:
                        continue
                    verdict = "significant" if d["significant"] else "not significant"
                    parts.append(f"{metric} {d['diff']:+.4f} [{d['lo']:+.3f},{d['hi']:+.3f}] {verdict}"
                                 if d.get("lo") is not None else f"{metric} {d['diff']:+.4f}")
                if parts:
                    lines.append(f"  adapted - {LABELS[other]:<17} " + "; ".join(parts))
    return "\n".join(lines)


def headline(results: dict) -> dict:
    """Per split, the few numbers a run is judged by, as flat keys that are also valid MLflow
    metric names: ``gauc_<scorer>`` and ``ndcg10_<scorer>`` of the model and its baselines
    (those the run computed), the adapted GAUC's 95% interval (``gauc_adapted_lo``/``_hi``) and
    ``gauc_adapted_minus_<baseline>`` with its paired interval. Read from the first head (the
    model's headline score); everything else stays in the full report."""
    out = {}
    for split, res in results.items():
        flat = {k: res.get(k) for k in HEADLINE_COUNTS}
        section = next((s for s in res.values() if isinstance(s, dict) and isinstance(s.get("adapted"), dict)), {})
        for metric, prefix in HEADLINE_METRICS.items():
            for scorer in (s for s in HEADLINE_SCORERS if s in section):
                m = section[scorer].get(metric) or {}
                flat[f"{prefix}_{scorer}"] = m.get("value")
                if (metric, scorer) == ("gauc", "adapted"):
                    flat["gauc_adapted_lo"], flat["gauc_adapted_hi"] = m.get("lo"), m.get("hi")
        for other in HEADLINE_SCORERS[1:]:
            diff = section.get("differences", {}).get(other, {}).get("gauc")
            if diff:
                name = f"gauc_adapted_minus_{other}"
                flat[name], flat[f"{name}_lo"], flat[f"{name}_hi"] = diff.get("diff"), diff.get("lo"), diff.get("hi")
        out[split] = flat
    return out


def headline_metrics(lines: dict) -> dict:
    """``headline``'s numbers as MLflow metrics, ``<split>.<key>`` (the counts left out)."""
    return {f"{split}.{k}": v for split, flat in lines.items() for k, v in flat.items()
            if k not in HEADLINE_COUNTS and v is not None}


def _curve_lines(split: str, curve: dict) -> list:
    lines = [f"\n{split}: GAUC by support rows used per task"]
    lines.append(f"  {'scorer':<18}" + "".join(f"{str(k):>9}" for k in curve["k"]))
    for row in ("adapted", "unadapted", "plain_finetuned", "plain"):
        if row in curve:
            lines.append(f"  {LABELS[row]:<18}" + "".join(f"{'-' if v is None else f'{v:.4f}':>9}"
                                                           for v in curve[row]))
    return lines


def curve_metrics(results: dict, all_step: int) -> list:
    """``[(name, value, step)]``: each split's support curve as MLflow metrics whose step is the
    number of support rows (``all`` at ``all_step``, the support cap S), so MLflow draws it."""
    out = []
    for split, res in results.items():
        curve = res.get("support_curve") if isinstance(res, dict) else None
        for row in ("adapted", "unadapted", "plain_finetuned") if curve else ():
            for k, v in zip(curve["k"], curve.get(row, ())):
                if v is not None:
                    out.append((f"{split}.support_gauc_{row}", v, all_step if k == "all" else int(k)))
    return out


def print_report(results: dict, out) -> None:
    print(format_report(results), file=out, flush=True)


def save_per_task(per_task: dict, directory: str) -> str:
    """One ``<split>.npz`` per split; keys ``<head>/<scorer>/<column>`` (task ids, rows, metrics)."""
    os.makedirs(directory, exist_ok=True)
    for split, scorers in per_task.items():
        arrays = {f"{name}/{col}": np.asarray(values) for name, pt in scorers.items()
                  for col, values in pt.items()}
        np.savez(os.path.join(directory, f"{split}.npz"), **arrays)
    return directory


def load_per_task(path: str) -> dict:
    """Inverse of ``save_per_task`` for one split file: ``{"<head>/<scorer>": per-task dict}``."""
    out: dict = {}
    with np.load(path, allow_pickle=False) as f:
        for key in f.files:
            name, _, col = key.rpartition("/")
            out.setdefault(name, {})[col] = f[key]
    return out
