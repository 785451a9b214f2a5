"""Write fixtures in the official formats from *our own* agents, for configurations the public fixtures do not have.

These are not references (our port checked against itself has zero error by construction); they prove that the
reference check reads every size and flag from the file, as it must for the further official fixtures of other
configurations: chunk length 1, ρ = 0, one critic, one flow step, best-of-n > 1, no gradient clip, and so on.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from qam_ray import reference_check
from qam_ray.agents import agent_class
from qam_ray.agents.base import sample_draws
from qam_ray.core.networks import MLP, EnsembleCritic

# The official metric groups (info/<group>/<name>); the checker reads only the last component.
GROUP = "actor"


def module_subs(agent) -> dict[str, str | tuple[str, ...]]:
    """Our module → the flax sub-module the official trees use under it; a module whose class names its children
    officially (``FLAX_NAMES``: an actor's ``MLP_0`` and heads, ``alpha``'s ``log_value``) → the tuple of them."""
    names = reference_check.official_names(agent)

    def children(module_name):
        return tuple(sorted({names[n].split(".")[1] for n in names if n.split(".")[0] == module_name}))

    return {name: children(name) if hasattr(module, "FLAX_NAMES") else "value_net"
            if isinstance(module, EnsembleCritic) or (isinstance(module, MLP) and name == "value")
            else "mlp" for name, module in agent.named_children()}


def tree(agent, values: dict[str, torch.Tensor], snapshot: str) -> dict[str, np.ndarray]:
    subs, names = module_subs(agent), reference_check.official_names(agent)
    arrays = {}
    for name, value in values.items():
        path, transposed = reference_check.flax_path(names[name], subs)
        array = value.detach().cpu().numpy().astype(np.float32)
        arrays[f"{snapshot}/{path}"] = array.T if transposed else array
    return arrays


def chunk_batch(batch_size: int, obs_dim: int, horizon: int, action_dim: int, discount: float, seed: int) -> dict:
    """A chunked batch with successes (masks 0) and chunks across an episode end (valid 0), as the format's."""
    g = torch.Generator().manual_seed(seed)
    terminal = (torch.rand(batch_size, horizon, generator=g) < 0.3).float()
    terminals = torch.cummax(terminal, 1).values
    valid = torch.ones(batch_size, horizon)
    valid[:, 1:] = 1.0 - terminals[:, :-1]
    valid[-1, -1] = 0.0  # as the format forces for H = 1
    rewards = torch.cumsum(-torch.rand(batch_size, horizon, generator=g) * discount ** torch.arange(horizon) * valid, 1)
    masks = torch.cummin(torch.where(torch.rand(batch_size, horizon, generator=g) < 0.2, 0.0, 1.0), 1).values
    return {"observations": torch.randn(batch_size, obs_dim, generator=g),
            "actions": torch.rand(batch_size, horizon, action_dim, generator=g) * 2 - 1,
            "rewards": rewards, "masks": masks, "valid": valid, "terminals": terminals,
            "next_observations": torch.randn(batch_size, horizon, obs_dim, generator=g)}


def write_fixture(path, method: str, batch_size: int = 6, seed: int = 0, acting_observations: int = 0,
                  per_update: dict[str, list] | None = None, **hyperparams) -> dict:
    """Two updates of our ``method`` agent on one batch, stored in its family's fixture format; returns the
    config_json.  ``per_update``: the family's FIXTURE_PER_UPDATE switches, one entry per update."""
    cls = agent_class(method)
    torch.manual_seed(seed)
    hp = cls.Hyperparams(**hyperparams)
    agent = cls(hp)
    with torch.no_grad():  # targets away from their online copies, as the official fixtures move them
        for target in agent.TARGETS:
            for p in getattr(agent, target).parameters():
                p.add_(0.05 * torch.randn_like(p))
    config = {**cls.FIXTURE_FIXED_FLAGS, **{k: v for k, v in vars(hp).items() if k != "clip_grad_max_norm"},
              "agent": cls.name, "variant": getattr(hp, "variant", method), "full_action_dim": hp.chunk_dim,
              "batch_size": batch_size, "clip_grad": hp.clip_grad_max_norm is not None,
              "clip_grad_max_norm": hp.clip_grad_max_norm, "adam_b1": 0.9, "adam_b2": 0.999, "adam_eps": 1e-8}
    config["actor_hidden_dims"], config["value_hidden_dims"] = list(hp.actor_hidden_dims), list(hp.value_hidden_dims)
    config.update(per_update or {})
    arrays = {"config_json": np.array(json.dumps(config)), "config": np.array(repr(config))}
    arrays.update(tree(agent, agent.state_dict(), "params_before"))
    batch = chunk_batch(batch_size, hp.obs_dim, hp.horizon_length, hp.action_dim, hp.discount, seed)
    arrays.update({f"batch/{k}": v.numpy() for k, v in batch.items()})
    generator = torch.Generator().manual_seed(seed + 1)
    if acting_observations:
        obs = torch.randn(acting_observations, hp.obs_dim, generator=generator)
        draws = sample_draws(agent.act_draw_specs(acting_observations), generator, "cpu")
        acting: dict = {}
        agent.act(obs, draws, intermediates=acting)
        arrays.update({"act/observations": obs.numpy(), **{f"act/{k}": v.numpy() for k, v in draws.items()},
                       **{k: v.numpy() for k, v in acting.items()}})
    optimizers = agent.make_optimizers()
    param_state = lambda p: next(o.state[p] for o in optimizers.values() if p in o.state)  # noqa: E731
    online = {n: p for n, p in agent.named_parameters() if p.requires_grad}
    for update, prefix in ((1, ""), (2, "step2/")):
        draws = sample_draws(agent.draw_specs(batch_size), generator, "cpu")
        grads = {}

        def keep():
            grads.update({n: p.grad.clone() for n, p in online.items()})

        options = {key: values[update - 1] for key, values in (per_update or {}).items()}
        metrics, inter = agent.update(optimizers, batch, draws, on_raw_gradients=keep, **options)
        arrays.update({prefix + k: v.numpy() for k, v in draws.items()})
        arrays.update({prefix + k: v.detach().numpy() for k, v in inter.items()})
        logged = {k: v for k, v in metrics.items() if k not in ("total_loss", "grad_norm")}
        arrays[prefix + "total_loss"] = metrics["total_loss"].numpy()
        for name, value in logged.items():
            arrays[f"{prefix}info/{GROUP}/{name}"] = arrays[f"{prefix}update_info/{GROUP}/{name}"] = value.numpy()
        norms = torch.stack([g.norm() for g in grads.values()])
        arrays[prefix + "grad_global_norm"] = torch.linalg.vector_norm(norms).numpy()
        arrays.update(tree(agent, grads, "grads" if update == 1 else "step2/grads"))
        snapshot = "params_after_one_update" if update == 1 else "params_after_two_updates"
        arrays.update(tree(agent, agent.state_dict(), snapshot))
        if update == 1:
            for ours, theirs in (("exp_avg", "mu"), ("exp_avg_sq", "nu")):
                state = {n: param_state(p)[ours] for n, p in online.items()}
                arrays.update(tree(agent, state, f"adam_after_one_update/{theirs}"))
    np.savez(path, **arrays)
    return config
