"""A trial's final policy as an MLflow model: a ``pyfunc`` that maps a batch of observations to action chunks.

    policy = mlflow.pyfunc.load_model(run.data.tags["policy_model_uri"])
    chunks = policy.predict(observations)          # (B, obs_dim) float32 → (B, horizon_length, action_dim)

The model holds only the agent's acting modules, its method and hyperparameters, and a copy of the ``qam_ray``
package (``code_paths``), so it loads with torch and numpy alone (no Ray).  Each ``predict`` draws fresh policy
noise from the model's own generator (seeded once at load, so a loaded model is reproducible).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import mlflow.pyfunc
import numpy as np

POLICY_FILE = "policy.pt"
MODEL_NAME = "policy"


class AgentPolicy(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from qam_ray.agents import agent_class

        payload = torch.load(context.artifacts["policy"], map_location="cpu", weights_only=False)
        cls = agent_class(payload["method"])
        self.agent = cls(cls.Hyperparams(**payload["hyperparams"]))
        missing, unexpected = self.agent.load_state_dict(payload["state"], strict=False)
        acting = tuple(self.agent.acting_modules())
        if unexpected or any(key.startswith(acting) for key in missing):
            raise ValueError(f"policy weights do not fit {payload['method']}: missing {missing}, extra {unexpected}")
        self.agent.eval()
        self.generator = torch.Generator().manual_seed(payload.get("seed", 0))

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        obs = torch.as_tensor(np.asarray(model_input, dtype=np.float32).reshape(len(model_input), -1))
        return self.agent.sample_actions(obs, self.generator).numpy()


@contextlib.contextmanager
def quiet_model_logging():
    """MLflow's advice while logging this model, which does not apply: the signature is given explicitly (no input
    example needed), and the PythonModel is pickled on purpose (its class ships in code_paths)."""
    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_logger.level
    pyfunc_logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*An input example was not provided")
        try:
            yield
        finally:
            pyfunc_logger.setLevel(level)


def log_policy(tracking_uri: str, run_id: str, method: str, agent, seed: int) -> str:
    """Log ``agent``'s acting modules as the run's MLflow model; returns its model URI."""
    import tempfile

    import mlflow
    import torch
    from mlflow.models import infer_signature

    import qam_ray

    acting = tuple(agent.acting_modules())
    state = {k: v.detach().cpu() for k, v in agent.state_dict().items() if k.startswith(acting)}
    payload = {"method": method, "hyperparams": vars(agent.hp), "state": state, "seed": seed}
    hp = agent.hp
    example = np.zeros((2, hp.obs_dim), np.float32)
    signature = infer_signature(example, np.zeros((2, hp.horizon_length, hp.action_dim), np.float32))
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as directory, mlflow.start_run(run_id=run_id), quiet_model_logging():
        path = os.path.join(directory, POLICY_FILE)
        torch.save(payload, path)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=AgentPolicy(), artifacts={"policy": path}, signature=signature,
            code_paths=[os.path.dirname(qam_ray.__file__)], pip_requirements=["torch", "numpy"])
    return info.model_uri
