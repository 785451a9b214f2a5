"""Domain table and per-method registry spot checks against QAM_SPEC §10-§11 and OGBENCH §2."""

import pytest

from qam_ray.agents import METHOD_NAMES, registry_hyperparams
from qam_ray.domains import DOMAIN_NAMES, DOMAINS, domain_of_env, get_domain, parse_singletask_name


def method_values(domain: str, method: str) -> dict:
    """The method's per-domain hyperparameters on task 1 of ``domain`` (env facts included)."""
    return registry_hyperparams(method, f"{domain}-singletask-task1-v0")


PAPER_DOMAINS = (
    'puzzle-3x3-play',
    'scene-play',
    'cube-double-play',
    'antmaze-large-navigate',
    'humanoidmaze-medium-navigate',
    'cube-triple-play',
    'cube-quadruple-play',
    'puzzle-4x4-play',
    'antmaze-giant-navigate',
    'humanoidmaze-large-navigate',
)


def test_the_ten_paper_domains_with_five_tasks_each():
    assert DOMAIN_NAMES == PAPER_DOMAINS
    assert METHOD_NAMES[:3] == ('QAM', 'QAM-E', 'QAM-F')
    for name, domain in DOMAINS.items():
        assert domain.in_paper
        assert domain.task_env_names == tuple(f'{name}-singletask-task{k}-v0' for k in range(1, 6))
        assert all(domain_of_env(env_name) is domain for env_name in domain.task_env_names)
    assert get_domain('cube-double-play').env_prefix == 'cube-double'
    assert get_domain('cube-double-play').dataset_type == 'play'


def test_spot_values_from_the_spec_table():
    def qam(domain, method):
        values = method_values(domain, method)
        return {k: values[k] for k in ('inv_temp', 'edit_scale', 'fql_alpha')}

    assert qam('puzzle-4x4-play', 'QAM-E') == {'inv_temp': 0.1, 'edit_scale': 0.9, 'fql_alpha': 0.0}
    assert qam('cube-triple-play', 'QAM-F') == {'inv_temp': 10.0, 'edit_scale': 0.0, 'fql_alpha': 300.0}
    assert qam('cube-triple-play', 'QAM') == {'inv_temp': 3.0, 'edit_scale': 0.0, 'fql_alpha': 0.0}
    assert qam('antmaze-large-navigate', 'QAM')['inv_temp'] == 10.0
    assert qam('cube-quadruple-play', 'QAM-F')['inv_temp'] == 0.3
    # Entries whose add-on weight is 0 equal plain QAM; they are kept as the official scripts have them.
    assert qam('cube-double-play', 'QAM-E') == qam('cube-double-play', 'QAM')
    assert qam('puzzle-3x3-play', 'QAM-F') == qam('puzzle-3x3-play', 'QAM')
    assert qam('scene-play', 'QAM-E')['edit_scale'] == 0.0
    # The baselines' columns of the same table.
    assert [method_values(d, 'FQL')['alpha'] for d in DOMAIN_NAMES] == [300, 300, 300, 3, 30, 30, 100, 1, 3, 30]
    assert [method_values(d, 'BAM')['inv_temp'] for d in DOMAIN_NAMES] == [10, 10, 10, 30, 10, 30, 10, 30, 30, 30]
    assert [method_values(d, 'IFQL')['kappa'] for d in DOMAIN_NAMES] == [0.95, 0.9, 0.9, 0.9, 0.7, 0.95, 0.95, 0.9,
                                                                         0.8, 0.8]


def test_per_domain_settings():
    for name in ('humanoidmaze-medium-navigate', 'humanoidmaze-large-navigate'):
        assert (get_domain(name).rho, get_domain(name).discount) == (0.0, 0.995)
        assert get_domain(name).episode_length == 2000
    assert get_domain('antmaze-giant-navigate').discount == 0.995
    assert get_domain('antmaze-giant-navigate').rho == 0.5
    assert get_domain('antmaze-large-navigate').discount == 0.99
    assert {name for name, d in DOMAINS.items() if d.sparse} == {'scene-play', 'puzzle-3x3-play', 'puzzle-4x4-play'}
    assert {name for name, d in DOMAINS.items() if d.dataset_size == '100M'} == {'cube-quadruple-play',
                                                                                   'puzzle-4x4-play'}
    assert {d.horizon_length for d in DOMAINS.values() if d.family in ('antmaze', 'humanoidmaze')} == {1}
    assert {d.horizon_length for d in DOMAINS.values() if d.family in ('cube', 'scene', 'puzzle')} == {5}
    episode_lengths = {name: d.episode_length for name, d in DOMAINS.items()}
    assert episode_lengths['cube-double-play'] == 500
    assert episode_lengths['cube-triple-play'] == episode_lengths['cube-quadruple-play'] == 1000
    assert episode_lengths['scene-play'] == 750
    assert (get_domain('puzzle-4x4-play').obs_dim, get_domain('humanoidmaze-large-navigate').action_dim) == (83, 21)


def test_derived_domains_for_generated_and_other_datasets():
    single = domain_of_env('cube-single-play-singletask-task3-v0')
    assert not single.in_paper
    assert (single.name, single.env_prefix, single.episode_length, single.obs_dim) == ('cube-single-play',
                                                                                        'cube-single', 200, 28)
    assert (single.horizon_length, single.discount, single.rho, single.sparse) == (5, 0.99, 0.5, False)
    assert single.hyperparams_domain == 'cube-double-play'
    for method in METHOD_NAMES:
        assert method_values('cube-single-play', method) == method_values('cube-double-play', method)

    noisy = domain_of_env('puzzle-3x3-noisy-singletask-task1-v0')
    assert (noisy.name, noisy.sparse, noisy.episode_length, noisy.in_paper) == ('puzzle-3x3-noisy', True, 500, False)
    assert method_values('puzzle-3x3-noisy', 'QAM-E') == method_values('puzzle-3x3-play', 'QAM-E')

    # A noisy version of a 100M paper domain uses the standard file.
    assert domain_of_env('cube-quadruple-noisy-singletask-task2-v0').dataset_size == '1M'
    stitch = domain_of_env('humanoidmaze-medium-stitch-singletask-task1-v0')
    assert (stitch.horizon_length, stitch.discount, stitch.rho) == (1, 0.995, 0.0)
    assert domain_of_env('puzzle-4x6-play-singletask-task1-v0').episode_length == 1000


def test_errors_are_clear():
    with pytest.raises(ValueError, match='paper domains are: puzzle-3x3-play, scene-play'):
        get_domain('cube-single-play')
    with pytest.raises(ValueError, match="method='QAM-X'"):
        method_values('scene-play', 'QAM-X')
    with pytest.raises(ValueError, match='singletask-task<1-5>-v0'):
        domain_of_env('cube-double-play-v0')
    with pytest.raises(ValueError, match='singletask-task<1-5>-v0'):
        domain_of_env('cube-double-play-singletask-task6-v0')
    with pytest.raises(ValueError, match='supported envs'):
        domain_of_env('pointmaze-medium-navigate-singletask-task1-v0')
    with pytest.raises(ValueError, match='dataset type'):
        domain_of_env('cube-double-navigate-singletask-task1-v0')


def test_parse_singletask_name():
    name = parse_singletask_name('humanoidmaze-medium-navigate-singletask-task4-v0')
    assert (name.env_prefix, name.dataset_type, name.task, name.family) == ('humanoidmaze-medium', 'navigate', 4,
                                                                             'humanoidmaze')
    assert name.dataset_name == 'humanoidmaze-medium-navigate-v0'
    assert name.env_id == 'humanoidmaze-medium-singletask-task4-v0'
