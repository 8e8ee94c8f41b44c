"""The MLflow model of a gmeta run, logged as models-from-code (this file is the model's code).

It imports no gmeta: ``mlflow models serve`` runs it in a plain environment (TensorFlow, numpy,
pandas). Its artifacts are the gmeta export (``gmeta_model``, which holds ``saved_model/``) and
the serving runtime (``runtime``, a copy of ``gmeta/trainer/serving/runtime.py`` loaded by path).

``predict`` takes a DataFrame of rows: the task column, ``is_query`` (0 support, 1 query), the
labels of the support rows and the model's features; each task adapts on its support rows inside
the SavedModel and every query row gets its adapted and unadapted score. It returns one row per
query row: the task id, ``row`` (the row's position in the input) and ``score_adapted``,
``score_unadapted`` (plus ``score_<head>_...`` for extra heads, e.g. MAML-ESMM's pCTCVR).
``params={"steps": k}`` adapts with k inner steps instead of the trained number. Rows it cannot
score (a missing column, an id of the wrong type, a negative or out-of-range row, a support row
without its label) raise an ``MlflowException`` with INVALID_PARAMETER_VALUE, which
``mlflow models serve`` answers with HTTP 400 and the runtime's message (any other exception
would reach the client as MLflow's generic "unexpected error", the cause only in the trace).
"""

import importlib.util
import os
from typing import Any, Optional

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel


class GmetaColdStartModel(PythonModel):
    def load_context(self, context):
        saved_model = os.path.join(context.artifacts["gmeta_model"], "saved_model")
        if not os.path.isdir(saved_model):
            raise FileNotFoundError(
                "this gmeta model has no SavedModel (its tables were over the serving limit when it "
                "was exported); build one with `gmeta predict --max-serving-table-bytes N ...`")
        spec = importlib.util.spec_from_file_location("gmeta_serving_runtime", context.artifacts["runtime"])
        runtime = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runtime)
        self.runtime = runtime.ServingRuntime(saved_model)
        self.input_error = runtime.InputError

    def predict(self, context, model_input: pd.DataFrame,
                params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
        steps = (params or {}).get("steps")
        try:
            return self.runtime.predict_frame(model_input, steps=None if steps is None else int(steps))
        except self.input_error as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None


mlflow.models.set_model(GmetaColdStartModel())
