"""RLlib integration, written once for every agent (``algorithm.py``: ``AgentConfig`` / ``AgentAlgorithm``,
``learner.py``, ``module.py``, ``chunk_env.py``), plus one config and one algorithm class per agent family, named as
RLlib names its own (``IQLConfig`` / ``IQL``): ``QAMConfig`` / ``QAM``, ``FQLConfig`` / ``FQL``, ``BAMConfig`` /
``BAM``, ``IFQLConfig`` / ``IFQL``, … derived from the method registry, so a new method needs no RLlib code:

    from qam_ray.rllib import FQLConfig
    algo = FQLConfig().ogbench("cube-double-play", task=2, dataset_dir="/data/ogbench").build_algo()

A family's config starts from its first registered label (``QAMConfig``: QAM; ``.ogbench(method="QAM-E")``
selects a variant) and its algorithm's ``get_default_config`` returns it.
"""

from __future__ import annotations

from qam_ray.agents import agent_classes, methods_of
from qam_ray.rllib.algorithm import AgentAlgorithm, AgentConfig, build_agent_config


def _family_classes(agent) -> tuple[type[AgentConfig], type[AgentAlgorithm]]:
    name = agent.name.upper()
    config_cls = type(f"{name}Config", (AgentConfig,), {
        "__module__": __name__, "default_method": methods_of(agent)[0], "family": agent.name,
        "__doc__": f"AgentConfig of the {name} family (methods {', '.join(methods_of(agent))}); hyperparameters: "
                   f"{agent.Hyperparams.__module__}.{agent.Hyperparams.__name__}.",
        "__init__": lambda self, algo_class=None: AgentConfig.__init__(self, algo_class or algo_cls)})
    algo_cls = type(name, (AgentAlgorithm,), {
        "__module__": __name__, "__doc__": f"AgentAlgorithm with {name}Config as its default config.",
        "get_default_config": classmethod(lambda cls: config_cls())})
    return config_cls, algo_cls


__all__ = ["AgentAlgorithm", "AgentConfig", "build_agent_config"]
for _agent in agent_classes().values():
    for _cls in _family_classes(_agent):
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)
