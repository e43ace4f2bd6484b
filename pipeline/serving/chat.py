"""The finetune-instruct and align-dpo stages' models as an MLflow "model from code": OpenAI-style
`messages` in, a `chat.completion` object out, answered as `python -m pipeline chat` does, in
the prompt template the checkpoint was tuned with."""

from __future__ import annotations

import time
import uuid
from typing import Any

import mlflow.models
from mlflow.pyfunc.model import PythonModel

from pipeline.data.instruct import format_prompt
from pipeline.errors import InputError
from pipeline.serving.inference import Generation, Sampling
from pipeline.serving.schema import bad_request, sampling


class InstructionChat(PythonModel):
    def load_context(self, context) -> None:
        self.generation = Generation(context.artifacts["checkpoint"], key="")
        self.template = self.generation.template()

    # model_input unannotated: MLflow would read a type hint as the signature. The base method
    # has no annotations and an empty body, so pyright takes it to return None.
    def predict(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, context, model_input, params: dict[str, Any] | None = None
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """One completion per conversation (the object itself for a single one, as OpenAI's
        API answers)."""
        options = sampling(params, self.generation.model.config.context_length)
        # a DataFrame (MLflow checked the signature): one conversation a row
        conversations = model_input["messages"]
        answers = [self._complete(self._instruction(m), options) for m in conversations]
        return answers[0] if len(answers) == 1 else answers

    def _instruction(self, messages: Any) -> str:
        """The one user message a checkpoint tuned on single-turn prompts can answer."""
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages is empty: send one message with role 'user'")
        if len(messages) != 1 or messages[0].get("role") != "user":
            roles = [m.get("role") for m in messages]
            raise bad_request(f"this model answers one instruction ({self.template} template, "
                              f"single turn): send one message with role 'user', got roles "
                              f"{roles}")  # fmt: skip
        if not messages[0]["content"].strip():
            raise bad_request("the user message's content is empty")
        return messages[0]["content"]

    def _complete(self, instruction: str, options: Sampling) -> dict[str, Any]:
        generation, tokenizer = self.generation, self.generation.tokenizer
        random = generation.generator(options)
        try:
            text = "".join(generation.answer(self.template, instruction, "", options, random))
        except InputError as error:
            raise bad_request(str(error)) from error
        prompt = format_prompt({"instruction": instruction}, self.template)
        used = len(tokenizer.encode_ordinary(prompt)), len(tokenizer.encode_ordinary(text))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": generation.config.get("stage", "gpt-pipeline"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length" if used[1] >= options.max_new_tokens else "stop",
            }],
            "usage": {"prompt_tokens": used[0], "completion_tokens": used[1],
                      "total_tokens": sum(used)},
        }  # fmt: skip


mlflow.models.set_model(InstructionChat())
