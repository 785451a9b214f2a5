"""The method registry: the QAM paper's method labels (those of ``qam_published_results.csv``) → agent classes.

Adding a method is one agent file and one line here.  A label names the agent family; the agent's
``PER_DOMAIN[label]`` table says how that method is configured on each paper domain (QAM-E and QAM-F are QAM
with an edit policy or a one-step policy switched on there).  Imports are lazy, so naming a method loads only
its own file.
"""

from __future__ import annotations

import importlib

from qam_ray.agents.base import Agent, AgentHyperparams, field_names
from qam_ray.domains import Domain, domain_of_env

METHODS: dict[str, str] = {
    "QAM": "qam_ray.agents.qam:QAMAgent",
    "QAM-E": "qam_ray.agents.qam:QAMAgent",
    "QAM-F": "qam_ray.agents.qam:QAMAgent",
    "FQL": "qam_ray.agents.fql:FQLAgent",
    "BAM": "qam_ray.agents.bam:BAMAgent",
    "IFQL": "qam_ray.agents.ifql:IFQLAgent",
    "IDQL": "qam_ray.agents.idql:IDQLAgent",
    "ReBRAC": "qam_ray.agents.rebrac:ReBRACAgent",
    "FEdit": "qam_ray.agents.fedit:FEditAgent",
    "DSRL": "qam_ray.agents.dsrl:DSRLAgent",
    "FBRAC": "qam_ray.agents.fbrac:FBRACAgent",
    "FAWAC": "qam_ray.agents.fawac:FAWACAgent",
    "SAC-Flow-G": "qam_ray.agents.sacflow:SACFlowAgent",
    "SAC-Flow-T": "qam_ray.agents.sacflow:SACFlowAgent",
    "SAC-Flow-naive": "qam_ray.agents.sacflow:SACFlowAgent",
    "SAC-Flow-G-scratch": "qam_ray.agents.sacflow_scratch:SACFlowScratchAgent",
    "SAC-Flow-T-scratch": "qam_ray.agents.sacflow_scratch:SACFlowScratchAgent",
    "SAC-Flow-naive-scratch": "qam_ray.agents.sacflow_scratch:SACFlowScratchAgent",
    "SMAC": "qam_ray.agents.smac:SMACAgent",
}
METHOD_NAMES = tuple(METHODS)


def agent_class(method: str) -> type[Agent]:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHOD_NAMES)}")
    module, _, name = METHODS[method].partition(":")
    return getattr(importlib.import_module(module), name)


def agent_classes() -> dict[str, type[Agent]]:
    """Every agent family once, by its ``name``."""
    return {cls.name: cls for cls in map(agent_class, METHOD_NAMES)}


def methods_of(agent: type[Agent]) -> tuple[str, ...]:
    return tuple(method for method in METHOD_NAMES if agent_class(method) is agent)


def registry_hyperparams(method: str, env_name: str) -> dict:
    """The hyperparameters the paper's protocol gives ``method`` on ``env_name``: the domain's env facts (chunk
    length, γ, ρ) under the method's per-domain values (a derived domain uses its nearest paper domain's)."""
    cls = agent_class(method)
    domain: Domain = domain_of_env(env_name)
    values = dict(horizon_length=domain.horizon_length, discount=domain.discount, rho=domain.rho)
    values.update(cls.PER_DOMAIN[method][domain.hyperparams_domain])
    return values


def make_hyperparams(method: str, env_name: str, obs_dim: int, action_dim: int,
                     overrides: dict | None = None) -> AgentHyperparams:
    """The paper's settings of ``method`` on ``env_name``, then ``overrides`` (hyperparameter names) on top."""
    cls = agent_class(method)
    known = field_names(cls.Hyperparams)
    unknown = set(overrides or {}) - set(known)
    if unknown:
        raise ValueError(f"{method}: unknown hyperparameter(s) {sorted(unknown)}; {cls.__name__} has: "
                         f"{', '.join(k for k in known if k not in ('obs_dim', 'action_dim'))}")
    values = dict(obs_dim=obs_dim, action_dim=action_dim, **registry_hyperparams(method, env_name))
    values.update(overrides or {})
    try:
        return cls.Hyperparams(**values)
    except TypeError as exc:  # e.g. a tuple field given an int
        raise ValueError(f"{method}: {exc}") from None
