"""What a run was made of, for its MLflow record: code and library versions, and the dataset.

The dataset digest is cheap and stable: the schema file's bytes plus every data file's path
and size (not its contents: hashing terabytes of ORC at every start would cost more than the
run). Two runs with the same digest read the same layout of the same files; a rewritten file
of the same size is the one change it misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import warnings

import gmeta
from gmeta.io import fs
from gmeta.trainer.parallel.comm import horovod_version


def source_commit() -> dict:
    """The git commit of the gmeta source, and whether the checkout had local changes (empty
    when gmeta is not installed from a git checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10,
                              check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head.stdout.strip(), "dirty": dirty}


def run_tags(world_size: int, model: str, meta: str) -> dict:
    """Tags that say what ran: versions, the source commit, the world size."""
    import mlflow
    import tensorflow as tf

    tags = {"gmeta.version": gmeta.__version__, "tensorflow.version": tf.__version__,
            "mlflow.version": mlflow.__version__, "gmeta.world_size": str(world_size),
            "gmeta.model": model, "gmeta.meta": meta}
    tags["horovod.version"] = horovod_version() or "not installed"
    source = source_commit()
    if source:
        tags["mlflow.source.git.commit"] = source["commit"]
        tags["gmeta.git_dirty"] = str(source["dirty"]).lower()
    return tags


def dataset_digest(data_dir: str) -> tuple:
    """``(digest, files)``: a sha256 prefix over the schema and the data files' paths and sizes."""
    h = hashlib.sha256()
    h.update(fs.read_text(fs.join(data_dir, "schema.json")).encode())
    files = 0
    for entry in fs.list_dir(data_dir):
        if entry.type.name != "Directory":
            continue
        for f in fs.list_dir(fs.join(data_dir, entry.base_name)):
            if f.type.name == "File":
                h.update(f"{entry.base_name}/{f.base_name}:{f.size}\n".encode())
                files += 1
    return h.hexdigest()[:16], files


def mlflow_dataset(data_dir: str, schema):
    """The dataset as an MLflow input: its source, name, digest and column schema."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema as MlflowSchema
    from mlflow.types.schema import Array

    digest, _ = dataset_digest(data_dir)
    kinds = {schema.task_column: DataType.long, schema.query_column: DataType.boolean}
    kinds.update({f.name: Array(DataType.long) if f.is_list else DataType.long for f in schema.sparse})
    columns = [ColSpec(kinds.get(name, DataType.float), name) for name in dict.fromkeys(schema.column_names())]
    name = os.path.basename(os.path.normpath(data_dir)) or data_dir
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": local/artifact, same thing
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(os.path.abspath(data_dir) if not fs.is_remote(data_dir) else data_dir)
    return MetaDataset(source=source, name=name, digest=digest, schema=MlflowSchema(columns))


def training_data(run) -> str:
    """Where an MLflow run of ``gmeta train`` read its dataset: the source of its ``training``
    dataset input (an absolute path), else its ``data`` parameter (as it was typed); "" when
    neither was logged."""
    for inp in run.inputs.dataset_inputs if run.inputs else ():
        if any(t.key == "mlflow.data.context" and t.value == "training" for t in inp.tags):
            try:
                source = json.loads(inp.dataset.source)
            except (TypeError, ValueError):
                continue
            where = (source.get("uri") or source.get("path")) if isinstance(source, dict) else None
            if where:
                return str(where)
    return run.data.params.get("data", "")
