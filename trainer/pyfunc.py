"""MLflow pyfunc wrapper around a gmeta export, so runs can be registered and served.

``predict`` takes a DataFrame of rows (one column per sparse and dense feature of the schema;
list features as lists) and returns the model's headline score per row *before* adaptation.
Adapted scores need a support set per task: use ``gmeta evaluate`` for those.
"""

from __future__ import annotations

import mlflow.pyfunc


class GmetaPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from gmeta.trainer.export import load_model

        self.learner, self.meta = load_model(context.artifacts["gmeta_model"])

    def predict(self, context, model_input, params=None):
        from gmeta.trainer.serving import score_rows

        return score_rows(self.learner, model_input)
