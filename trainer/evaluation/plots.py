"""The run's plots, as PNG files for MLflow: learning curve, GAUC against support size,
calibration. Pure functions of what training and evaluation already computed; no TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np

from gmeta.trainer.evaluation.rows import label_key, score_key


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def learning_curve(history: dict, validation: list, path: str) -> str:
    """Training loss per logged step and per epoch (the plain network's alongside when it
    trained), and the validation GAUC per epoch when there was a validation split."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if validation else 1, figsize=(11 if validation else 6, 4), squeeze=False)
    ax = axes[0][0]
    steps = history.get("step_log") or []
    if steps:
        ax.plot([p["step"] for p in steps], [p["loss"] for p in steps], lw=1, alpha=0.6, label="loss (logged steps)")
    per_epoch = history.get("loss") or []
    steps_per_epoch = max(1, int(history.get("steps", 0)) // max(1, len(per_epoch))) if per_epoch else 1
    if per_epoch:
        x = [(e + 1) * steps_per_epoch for e in range(len(per_epoch))]
        ax.plot(x, per_epoch, "o-", label="epoch mean loss")
    if history.get("plain_loss"):
        x = [(e + 1) * steps_per_epoch for e in range(len(history["plain_loss"]))]
        ax.plot(x, history["plain_loss"], "s--", label="plain network, epoch mean")
    ax.set_xlabel("global step")
    ax.set_ylabel("training loss (global mean)")
    ax.set_title("learning curve")
    ax.legend(fontsize=8)
    if validation:
        ax = axes[0][1]
        epochs = [v["epoch"] for v in validation]
        for key, label in (("gauc_adapted", "adapted"), ("gauc_unadapted", "unadapted")):
            ax.plot(epochs, [v.get(key) for v in validation], "o-", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("GAUC")
        ax.set_title(f"validation ({validation[0].get('split', 'val')})")
        ax.legend(fontsize=8)
    return _save(fig, plt, path)


def support_curve(curve: dict, path: str) -> str:
    """GAUC against the number of support rows used for adaptation, per split: the adapted
    model, the unadapted model and the fine-tuned plain network (when it trained)."""
    plt = _pyplot()
    splits = list(curve)
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(5 * max(1, len(splits)), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        c = curve[split]
        labels = [str(k) for k in c["k"]]
        x = np.arange(len(labels))
        for key, style in (("adapted", "o-"), ("unadapted", "--"), ("plain_finetuned", "s-"), ("plain", ":")):
            if key in c:
                ax.plot(x, [np.nan if v is None else v for v in c[key]], style, label=key.replace("_", " "))
        ax.set_xticks(x, labels)
        ax.set_xlabel("support rows used per task")
        ax.set_ylabel("GAUC")
        ax.set_title(split)
        ax.legend(fontsize=8)
    return _save(fig, plt, path)


def calibration_bins(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict:
    """Equal-count bins of the score: mean score, mean label and rows per bin."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    order = np.argsort(scores, kind="stable")
    parts = [p for p in np.array_split(order, min(bins, max(1, scores.size))) if p.size]
    return {"mean_score": [float(scores[p].mean()) for p in parts],
            "mean_label": [float(labels[p].mean()) for p in parts],
            "rows": [int(p.size) for p in parts]}


def calibration(rows_by_split: dict, head: str, path: str, probabilities: bool = True) -> str:
    """Mean label against mean score in equal-count bins, adapted and unadapted, per split."""
    plt = _pyplot()
    splits = [s for s, rows in rows_by_split.items() if rows and label_key(head) in rows]
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(5 * max(1, len(splits)), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        rows = rows_by_split[split]
        label = rows[label_key(head)]
        lo, hi = (0.0, 1.0) if probabilities else (float(label.min()), float(label.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, label="perfect")
        for scorer in ("adapted", "unadapted"):
            b = calibration_bins(rows[score_key(head, scorer)], label)
            ax.plot(b["mean_score"], b["mean_label"], "o-", label=scorer)
        ax.set_xlabel("mean predicted " + ("probability" if probabilities else "score"))
        ax.set_ylabel("mean observed label")
        ax.set_title(f"{split} ({head})")
        ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
