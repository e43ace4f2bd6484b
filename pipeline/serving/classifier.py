"""The finetune-classifier stage's model as an MLflow "model from code": texts in, a label and
its probability per text out, as `python -m pipeline classify` gives them."""

from __future__ import annotations

from typing import Any

import mlflow.models
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from pipeline.errors import InputError
from pipeline.serving.inference import Classification
from pipeline.serving.schema import bad_request, column


class Classifier(PythonModel):
    def load_context(self, context) -> None:
        self.classification = Classification(context.artifacts["checkpoint"], key="")

    # model_input unannotated: MLflow would read a type hint as the signature. The base method
    # has no annotations and an empty body, so pyright takes it to return None.
    def predict(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, context, model_input, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            predicted = self.classification.predict(column(model_input, "classifier"))
        except InputError as error:
            raise bad_request(str(error)) from error
        return pd.DataFrame(predicted, columns=["label", "probability"])


mlflow.models.set_model(Classifier())
