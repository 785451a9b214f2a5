"""The paper's 10 OGBench domains and their env facts: the single source of truth.

Values come from QAM_SPEC.md §9-§11 (experiments/reproduce.py of the official repo) and OGBENCH.md §2 (dims and
evaluation time limits). Only facts about the environment and its data live here (tasks, dataset, chunk length,
γ, ρ, sparsity, episode length); each method's per-domain values live in its agent file (``qam_ray/agents``).
Nothing here imports torch, gymnasium or ogbench, so configs can use it cheaply.

A *domain* is ``<env>-<dataset type>`` (e.g. ``cube-double-play``); its five tasks are the singletask env names
``<domain>-singletask-task{1..5}-v0`` that ``ogbench.make_env_and_datasets`` accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import NamedTuple

NUM_TASKS = 5

# Families whose policies act in 5-step action chunks; the maze families use chunk length 1 (QAM_SPEC §10).
MANIPULATION_FAMILIES = ('cube', 'scene', 'puzzle')
MAZE_FAMILIES = ('antmaze', 'humanoidmaze')
# Families whose dense reward (minus the number of unsolved sub-goals) is replaced by -1[r != 0] (QAM_SPEC §3).
SPARSE_FAMILIES = ('scene', 'puzzle')
# Dataset types OGBench publishes per family (OGBENCH.md §2); other types cannot name a dataset.
DATASET_TYPES = {'manipulation': ('play', 'noisy'), 'maze': ('navigate', 'stitch', 'explore')}

_SINGLETASK_RE = re.compile(r'^(?P<env>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<type>[a-z]+)-singletask-task(?P<task>[1-5])-v0$')
SINGLETASK_FORM = '<env>-<dataset type>-singletask-task<1-5>-v0 (e.g. cube-double-play-singletask-task2-v0)'


class SingletaskName(NamedTuple):
    """The parts of an OGBench singletask dataset name such as ``cube-double-play-singletask-task2-v0``."""

    env_prefix: str  # 'cube-double'
    dataset_type: str  # 'play'
    task: int  # 2

    @property
    def domain_name(self) -> str:
        return f'{self.env_prefix}-{self.dataset_type}'

    @property
    def dataset_name(self) -> str:
        """Stem of the dataset files shared by all 5 tasks: ``cube-double-play-v0`` (.npz and -val.npz)."""
        return f'{self.domain_name}-v0'

    @property
    def env_id(self) -> str:
        """The gymnasium id ogbench builds for evaluation: ``cube-double-singletask-task2-v0``."""
        return f'{self.env_prefix}-singletask-task{self.task}-v0'

    @property
    def family(self) -> str:
        return self.env_prefix.split('-')[0]


def parse_singletask_name(env_name: str) -> SingletaskName:
    match = _SINGLETASK_RE.match(env_name)
    if match is None:
        raise ValueError(f'{env_name!r} is not an OGBench singletask name; expected {SINGLETASK_FORM}.')
    return SingletaskName(match['env'], match['type'], int(match['task']))


@dataclass(frozen=True)
class Domain:
    name: str  # '<env>-<dataset type>', e.g. 'cube-double-play'
    env_prefix: str  # gymnasium id prefix, e.g. 'cube-double'
    # '1M' = the standard OGBench file (1M transitions for most domains, more for cube-triple); '100M' = the sharded
    # 100M-transition dataset the paper trains on for cube-quadruple and puzzle-4x4.
    dataset_size: str
    horizon_length: int  # action chunk length h_c
    discount: float
    rho: float  # pessimism: TD target uses mean - rho * std over the critic ensemble
    sparse: bool
    episode_length: int  # evaluation TimeLimit
    obs_dim: int  # for reference; the dataset and env are authoritative
    action_dim: int
    in_paper: bool = True  # False for domains derived for generated/other datasets (see derived_domain)
    # The paper domain whose per-method hyperparameters apply: the domain itself, or for a derived domain its
    # nearest paper domain (see derived_domain).
    hyperparams_domain: str = ''

    def __post_init__(self):
        if not self.hyperparams_domain:
            object.__setattr__(self, 'hyperparams_domain', self.name)

    @property
    def family(self) -> str:
        return self.env_prefix.split('-')[0]

    @property
    def dataset_type(self) -> str:
        return self.name[len(self.env_prefix) + 1 :]

    @property
    def task_env_names(self) -> tuple[str, ...]:
        return tuple(f'{self.name}-singletask-task{k}-v0' for k in range(1, NUM_TASKS + 1))


def _paper_domain(name, env_prefix, *, episode_length, obs_dim, action_dim, dataset_size='1M', discount=0.99,
                  rho=0.5) -> Domain:
    family = env_prefix.split('-')[0]
    return Domain(
        name=name,
        env_prefix=env_prefix,
        dataset_size=dataset_size,
        horizon_length=1 if family in MAZE_FAMILIES else 5,
        discount=discount,
        rho=rho,
        sparse=family in SPARSE_FAMILIES,
        episode_length=episode_length,
        obs_dim=obs_dim,
        action_dim=action_dim,
    )


# In the order of QAM_SPEC §10.
_PAPER_DOMAINS = (
    _paper_domain('puzzle-3x3-play', 'puzzle-3x3', episode_length=500, obs_dim=55, action_dim=5),
    _paper_domain('scene-play', 'scene', episode_length=750, obs_dim=40, action_dim=5),
    _paper_domain('cube-double-play', 'cube-double', episode_length=500, obs_dim=37, action_dim=5),
    _paper_domain('antmaze-large-navigate', 'antmaze-large', episode_length=1000, obs_dim=29, action_dim=8),
    _paper_domain('humanoidmaze-medium-navigate', 'humanoidmaze-medium', episode_length=2000, obs_dim=69,
                  action_dim=21, discount=0.995, rho=0.0),
    _paper_domain('cube-triple-play', 'cube-triple', episode_length=1000, obs_dim=46, action_dim=5),
    _paper_domain('cube-quadruple-play', 'cube-quadruple', episode_length=1000, obs_dim=55, action_dim=5,
                  dataset_size='100M'),
    _paper_domain('puzzle-4x4-play', 'puzzle-4x4', episode_length=500, obs_dim=83, action_dim=5,
                  dataset_size='100M'),
    _paper_domain('antmaze-giant-navigate', 'antmaze-giant', episode_length=1000, obs_dim=29, action_dim=8,
                  discount=0.995),
    _paper_domain('humanoidmaze-large-navigate', 'humanoidmaze-large', episode_length=2000, obs_dim=69,
                  action_dim=21, discount=0.995, rho=0.0),
)
DOMAINS: dict[str, Domain] = {domain.name: domain for domain in _PAPER_DOMAINS}
DOMAIN_NAMES = tuple(DOMAINS)

# Manipulation envs our generator supports that no paper domain uses: (nearest paper domain, TimeLimit, obs_dim).
# Nearest = the same family with the closest number of objects: cube-single takes cube-double's per-method
# hyperparameters, the larger puzzles take puzzle-4x4's.
_NON_PAPER_ENVS = {
    'cube-single': ('cube-double-play', 200, 28),
    'puzzle-4x5': ('puzzle-4x4-play', 1000, 99),
    'puzzle-4x6': ('puzzle-4x4-play', 1000, 115),
}


def get_domain(name: str) -> Domain:
    """One of the paper's 10 domains by name, e.g. ``get_domain('cube-double-play')``."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f'Unknown domain {name!r}; the paper domains are: {", ".join(DOMAIN_NAMES)}.') from None


def derived_domain(env_prefix: str, dataset_type: str) -> Domain:
    """Settings for a dataset outside the paper's 10 domains (e.g. generated ``cube-single-play``, ``scene-noisy``).

    The same env with another dataset type (``-noisy``, ``-stitch``) keeps that paper domain's settings, as the
    official dataset-quality study does (QAM_SPEC §11); an env the paper never used takes its family's chunking,
    discount, pessimism and sparsity plus the hyperparameters of the nearest paper domain (see _NON_PAPER_ENVS).
    A derived domain always uses the standard ('1M') dataset file, never 100M shards.
    """
    same_env = [domain for domain in _PAPER_DOMAINS if domain.env_prefix == env_prefix]
    if same_env:
        base, episode_length, obs_dim = same_env[0], same_env[0].episode_length, same_env[0].obs_dim
    elif env_prefix in _NON_PAPER_ENVS:
        base_name, episode_length, obs_dim = _NON_PAPER_ENVS[env_prefix]
        base = DOMAINS[base_name]
    else:
        supported = sorted({domain.env_prefix for domain in _PAPER_DOMAINS} | set(_NON_PAPER_ENVS))
        raise ValueError(f'No domain settings for env {env_prefix!r}; supported envs: {", ".join(supported)}.')
    kind = 'maze' if base.family in MAZE_FAMILIES else 'manipulation'
    if dataset_type not in DATASET_TYPES[kind]:
        raise ValueError(
            f'Unknown dataset type {dataset_type!r} for {env_prefix!r}; expected one of {DATASET_TYPES[kind]}.'
        )
    return replace(
        base,
        name=f'{env_prefix}-{dataset_type}',
        env_prefix=env_prefix,
        dataset_size='1M',
        episode_length=episode_length,
        obs_dim=obs_dim,
        in_paper=False,
        hyperparams_domain=base.name,
    )


def domain_of_env(env_name: str) -> Domain:
    """The domain of a singletask env name: a paper domain, or a derived one for other datasets."""
    parsed = parse_singletask_name(env_name)
    if parsed.domain_name in DOMAINS:
        return DOMAINS[parsed.domain_name]
    return derived_domain(parsed.env_prefix, parsed.dataset_type)
