"""The MLflow pyfunc of a registered adapter (logged as "models from code", so nothing is pickled):
a batch of prompts in the adapter's language → its conditioning tensors, named as the stock
pipelines' keyword arguments: `prompt_embeds` (B, tokens, width) and, for SDXL, `pooled_prompt_embeds`.

Signature: a list of strings (one unnamed string column) → float32 tensors `prompt_embeds` (B, L, D) [and
`pooled_prompt_embeds` (B, P)]; the registered model carries an input example in the target language.

    model = mlflow.pyfunc.load_model("models:/pea-adapter-zh@champion")
    pipe(**{k: torch.from_numpy(v) for k, v in model.predict(["左边有一个红色的圆形"]).items()})
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class AdapterModel(PythonModel):
    def load_context(self, context) -> None:
        from pea.adapter import PEAAdapter
        from pea.models import device, load_student
        from pea.spec import StudentSpec

        cfg = context.model_config
        self.adapter = PEAAdapter.from_pretrained(context.artifacts["adapter"]).eval().to(device())
        # Only the settings that are set: a serving environment with an older pea.spec still loads the model.
        optional = {k: cfg[f"student_{k}"] for k in ("variant", "trained_length") if cfg.get(f"student_{k}") is not None}
        self.student = load_student(StudentSpec(id=cfg["student_id"], revision=cfg["student_revision"],
                                                max_length=cfg["student_max_length"], **optional))

    def predict(self, context, model_input, params=None) -> dict[str, np.ndarray]:
        from pea.pipeline import prompt_kwargs

        if isinstance(model_input, pd.DataFrame):
            if model_input.shape[1] != 1:
                raise ValueError(f"expected one column of prompts, got columns {list(model_input.columns)}")
            model_input = model_input.iloc[:, 0]
        prompts = [str(p) for p in (model_input if not isinstance(model_input, str) else [model_input])]
        kwargs = prompt_kwargs(self.adapter, self.student, prompts)
        return {k: v.float().cpu().numpy() for k, v in kwargs.items() if not k.startswith("negative_")}


mlflow.models.set_model(AdapterModel())
