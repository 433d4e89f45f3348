"""The MLflow pyfunc of a registered adapter (logged as "models from code", so nothing is pickled):
a batch of prompts in the adapter's language → its conditioning tensors, named as the stock
pipelines' keyword arguments: `prompt_embeds` (B, tokens, width) and, for SDXL, `pooled_prompt_embeds`.

Signature: a list of strings (one unnamed string column) → float32 tensors `prompt_embeds` (B, L, D) [and
`pooled_prompt_embeds` (B, P)]; the registered model carries an input example in the target language. `predict`'s
input is typed `pd.DataFrame`, what MLflow hands it once the signature is enforced: one of the hints MLflow infers
no schema from, so the explicit signature pea.registry.signature() logs stands (a `list[str]` hint would make
MLflow log the signature it infers from the hints instead, whose output is `Any`) and MLflow 3 no longer warns
that predict has no type hints. model_config is the version's record (pea.registry.record); this reads its student_* keys.

    model = mlflow.pyfunc.load_model("models:/pea-adapter-zh@champion")
    pipe(**{k: torch.from_numpy(v) for k, v in model.predict(["左边有一个红色的圆形"]).items()})
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class AdapterModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from pea.method.adapter import PEAAdapter
        from pea.models import device, load_student
        from pea.spec import StudentSpec

        cfg = context.model_config
        self.adapter = PEAAdapter.from_pretrained(context.artifacts["adapter"]).eval().to(device())
        # Only the settings that are set: a serving environment with an older pea.spec still loads the model. Read
        # here, not through pea.registry.record.student: importing the registry package (evaluate, train) would
        # add ≈ 3 s to every model load.
        optional = {k: cfg[f"student_{k}"] for k in ("variant", "trained_length") if cfg.get(f"student_{k}") is not None}
        self.student = load_student(StudentSpec(id=cfg["student_id"], revision=cfg["student_revision"],
                                                max_length=cfg["student_max_length"], **optional))

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        from pea.models.pipeline import prompt_kwargs

        if not isinstance(model_input, pd.DataFrame):  # a direct call with a list or a string, no pyfunc wrapper
            model_input = pd.DataFrame({"prompt": [model_input] if isinstance(model_input, str) else list(model_input)})
        if model_input.shape[1] != 1:
            raise ValueError(f"expected one column of prompts, got columns {list(model_input.columns)}")
        prompts = [str(p) for p in model_input.iloc[:, 0]]
        kwargs = prompt_kwargs(self.adapter, self.student, prompts)
        return {k: v.float().cpu().numpy() for k, v in kwargs.items() if not k.startswith("negative_")}


mlflow.models.set_model(AdapterModel())
