"""``gmeta env``: versions of the stack and Horovod's build capabilities, for bug reports."""

from __future__ import annotations

import json
import platform

from gmeta import __version__
from gmeta.trainer.parallel.comm import horovod_build_info


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _version(module_name: str):
    try:
        mod = __import__(module_name)
        return getattr(mod, "__version__", "unknown")
    except Exception as exc:  # noqa: BLE001 - an absent optional package is a fact to report
        return f"absent ({type(exc).__name__})"


def collect() -> dict:
    info = {
        "gmeta": __version__,
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "tensorflow_io": _version("tensorflow_io"),
        "pyarrow": _version("pyarrow"),
        "numpy": _version("numpy"),
        "mlflow": _version("mlflow"),
        "sok": _version("sparse_operation_kit"),
        "horovod": horovod_build_info(),
    }
    try:
        import tensorflow as tf
        info["gpus"] = len(tf.config.list_physical_devices("GPU"))
    except Exception:  # noqa: BLE001
        info["gpus"] = None
    return info


def main(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    hvd = info.pop("horovod")
    width = max(len(k) for k in info) + 2
    for k, v in info.items():
        print(f"{k:<{width}}{v}")
    if hvd.get("installed"):
        caps = [k[:-6] for k, v in hvd.items() if k.endswith("_built") and v]
        print(f"{'horovod':<{width}}{hvd['version']}  built with: {', '.join(sorted(caps))}")
    else:
        print(f"{'horovod':<{width}}absent: {hvd.get('error')}")
    return 0
