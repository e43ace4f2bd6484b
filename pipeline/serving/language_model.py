"""The pretrain stage's model as an MLflow "model from code": prompts in, completions out.

MLflow runs this file to build the model (`mlflow.models.set_model`); the weights come from the
checkpoint directory logged beside it as the `checkpoint` artifact, read in `load_context`.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
from mlflow.pyfunc.model import PythonModel

from pipeline.errors import InputError
from pipeline.serving.inference import Generation
from pipeline.serving.schema import bad_request, column, sampling


class LanguageModel(PythonModel):
    """Continues each prompt as `python -m pipeline generate` does (without echoing it)."""

    def load_context(self, context) -> None:
        self.generation = Generation(context.artifacts["checkpoint"], key="")

    # model_input unannotated: MLflow would read a type hint as the signature. The base method
    # has no annotations and an empty body, so pyright takes it to return None.
    def predict(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, context, model_input, params: dict[str, Any] | None = None
    ) -> list[str]:
        generation = self.generation
        options = sampling(params, generation.model.config.context_length)
        prompts = column(model_input, "language-model")
        for i, prompt in enumerate(prompts, start=1):
            if not isinstance(prompt, str) or not prompt:
                raise bad_request(f"prompt {i} must be a non-empty string, got {prompt!r}")
        try:
            return ["".join(generation.stream(p, options, generation.generator(options)))
                    for p in prompts]  # fmt: skip
        except InputError as error:
            raise bad_request(str(error)) from error


mlflow.models.set_model(LanguageModel())
