"""What the served models take and give: their signatures, input examples and request checks.

A bad request raises `bad_request`: an MlflowException with INVALID_PARAMETER_VALUE, which
MLflow's scoring server answers with HTTP 400 and the message (any other exception in `predict`
becomes a 400 that only says the evaluation failed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

from pipeline.serving.inference import Sampling

GENERATION_PARAMS = ParamSchema([
    ParamSpec("max_new_tokens", "long", None),
    ParamSpec("temperature", "double", Sampling.temperature),
    ParamSpec("top_k", "long", None),
    ParamSpec("top_p", "double", None),
    ParamSpec("seed", "long", None),
])  # fmt: skip
"""The sampling options of `python -m pipeline generate` / `chat`, with their defaults
(`max_new_tokens`: the commands' 100, or the model's context when that is shorter)."""
PARAM_NAMES = tuple(p.name for p in GENERATION_PARAMS.params)

_MESSAGES = Array(Object([Property("role", "string"), Property("content", "string")]))
_CHOICE = Object([
    Property("index", "long"),
    Property("message", Object([Property("role", "string"), Property("content", "string")])),
    Property("finish_reason", "string"),
])  # fmt: skip
_USAGE = Object([Property(f"{k}_tokens", "long") for k in ("prompt", "completion", "total")])
_CHAT_COMPLETION = Schema([
    ColSpec("string", "id"), ColSpec("string", "object"), ColSpec("long", "created"),
    ColSpec("string", "model"), ColSpec(Array(_CHOICE), "choices"), ColSpec(_USAGE, "usage"),
])  # fmt: skip
SIGNATURES = {
    "language-model": ModelSignature(
        Schema([ColSpec("string")]), Schema([ColSpec("string")]), GENERATION_PARAMS
    ),
    "classifier": ModelSignature(
        Schema([ColSpec("string")]),
        Schema([ColSpec("string", "label"), ColSpec("double", "probability")]),
    ),
    "chat": ModelSignature(
        Schema([ColSpec(_MESSAGES, "messages")]),
        _CHAT_COMPLETION,
        GENERATION_PARAMS,
    ),
}
"""By model kind: what serving validates requests against and the MLflow UI shows. Prompts and
texts are one unnamed column: a string, a list of strings, or a DataFrame's `prompt` / `text`."""
COLUMNS = {"language-model": ("prompts", "prompt"), "classifier": ("texts", "text")}
"""By model kind whose input is one column: what its values are, and the name it takes for that
column besides none (a string, a list, `{"inputs": [...]}`)."""
REQUEST_FORMS = {
    "language-model": '{"inputs": ["...", ...]}, {"prompt": "..."} or a DataFrame column '
    '"prompt" ({"dataframe_records": [{"prompt": "..."}, ...]})',
    "classifier": '{"inputs": ["...", ...]} or a DataFrame column "text" '
    '({"dataframe_records": [{"text": "..."}, ...]})',
}
"""By model kind: the request bodies `column` takes (the chat models' `messages` column is named
in their signature, which MLflow checks)."""
INPUT_EXAMPLES: dict[str, Any] = {
    "language-model": (["Every effort moves you"], {"max_new_tokens": 8}),
    "classifier": ["You won a free prize, call now!", "See you at lunch tomorrow?"],
    "chat": (
        {"messages": [{"role": "user", "content": "Name a primary color."}]},
        {"max_new_tokens": 8},
    ),
}


def bad_request(message: str) -> MlflowException:
    """What `predict` raises for a request it cannot answer: HTTP 400 with `message`."""
    return MlflowException.invalid_parameter_value(message)


def sampling(params: Mapping[str, Any] | None, context_length: int) -> Sampling:
    """The request's generation params (MLflow has checked their types against the signature and
    filled in the defaults); `max_new_tokens` may not exceed the model's context."""
    given = {k: v for k, v in (params or {}).items() if v is not None}
    given.setdefault("max_new_tokens", min(Sampling.max_new_tokens, context_length))
    options = Sampling(**given)
    if not 0 <= options.max_new_tokens <= context_length:
        raise bad_request(f"max_new_tokens must be between 0 and the model's context length "
                          f"{context_length}, got {options.max_new_tokens}")  # fmt: skip
    return options


def column(model_input: Any, kind: str) -> list[Any]:
    """The values of a one-column input (a DataFrame, as MLflow hands it over after checking the
    signature), a list's items spread out: `{"prompt": ["a", "b"]}` is two prompts.

    The column is unnamed or the model kind's own (`COLUMNS`); any other is a request in a form
    the model does not take, refused with the forms it does: MLflow hands any body with a key
    of its unwrapped LLM requests (`input`, `prompt`, `messages`) over as that column and would
    answer it with a bare list instead of `{"predictions": ...}`.
    """
    if not hasattr(model_input, "iloc"):
        values = list(model_input)
    else:
        what, name = COLUMNS[kind]
        given = [c for c in model_input.columns if c not in (0, name)]
        if given:
            raise bad_request(f'send {what} as {REQUEST_FORMS[kind]}, not as "{given[0]}"')
        values = list(model_input.iloc[:, 0])
    return [v for value in values for v in (value if isinstance(value, list) else [value])]
