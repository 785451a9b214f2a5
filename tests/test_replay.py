"""ChunkReplayBuffer against chunks worked out by hand (QAM_SPEC §3, FIXTURE_FORMAT §5), horizon 3, discount 0.9.

Toy dataset: 3 episodes of lengths 3, 2 and 4 (rows 0-2, 3-4, 5-8). Successes (reward 0, mask 0) at rows 2 and 6.

    row        0    1    2  |  3    4  |  5    6    7    8
    reward    -2   -1    0  | -1   -1  | -1    0   -1   -1
    mask       1    1    0  |  1    1  |  1    0    1    1
    terminal   0    0    1  |  0    1  |  0    0    0    1

observations[i] = (i, 10 + i), next_observations[i] = (100 + i, 200 + i), actions[i] = (i / 10, -i / 10).
"""

import numpy as np
import pytest
import torch

from qam_ray.data.replay import ChunkReplayBuffer

H = 3
GAMMA = 0.9


def toy_arrays():
    rows = np.arange(9, dtype=np.float32)
    return {
        'observations': np.stack([rows, 10 + rows], axis=1),
        'next_observations': np.stack([100 + rows, 200 + rows], axis=1),
        'actions': np.stack([rows / 10, -rows / 10], axis=1),
        'rewards': np.array([-2, -1, 0, -1, -1, -1, 0, -1, -1], dtype=np.float32),
        'masks': np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=np.float32),
        'terminals': np.array([0, 0, 1, 0, 1, 0, 0, 0, 1], dtype=np.float32),
    }


# Expected chunk per start index, computed by hand.
EXPECTED = {
    # Inside episode 1, success on the last step: rewards -2, -2 + 0.9(-1), -2.9 + 0.81(0); the mask drops to 0.
    0: dict(valid=[1, 1, 1], terminals=[0, 0, 1], rewards=[-2, -2.9, -2.9], masks=[1, 1, 0], next_rows=[0, 1, 2]),
    # Crosses the end of episode 1 after step 1: step 2 (row 3) is invalid, s' repeats row 2's.
    1: dict(valid=[1, 1, 0], terminals=[0, 1, 1], rewards=[-1, -1, -1], masks=[1, 0, 0], next_rows=[1, 2, 2]),
    # Starts on the last row of episode 1: only step 0 is valid.
    2: dict(valid=[1, 0, 0], terminals=[1, 1, 1], rewards=[0, 0, 0], masks=[0, 0, 0], next_rows=[2, 2, 2]),
    # Starts on the last row of episode 2; the success at row 6 is in episode 3 and must not cut the mask.
    4: dict(valid=[1, 0, 0], terminals=[1, 1, 1], rewards=[-1, -1, -1], masks=[1, 1, 1], next_rows=[4, 4, 4]),
    # Success in the middle of the chunk (row 6) keeps the mask at 0 although row 7's mask is 1.
    5: dict(valid=[1, 1, 1], terminals=[0, 0, 0], rewards=[-1, -1, -1.81], masks=[1, 0, 0], next_rows=[5, 6, 7]),
    # Last full window: -0 + 0.9(-1) + 0.81(-1).
    6: dict(valid=[1, 1, 1], terminals=[0, 0, 1], rewards=[0, -0.9, -1.71], masks=[0, 0, 0], next_rows=[6, 7, 8]),
}


@pytest.fixture
def buffer():
    return ChunkReplayBuffer.from_arrays(toy_arrays(), device='cpu')


def test_gather_chunks_matches_hand_computed_values(buffer):
    starts = sorted(EXPECTED)
    batch = buffer.gather_chunks(torch.tensor(starts), H, GAMMA)

    def expected(field):
        return torch.tensor([EXPECTED[t][field] for t in starts], dtype=torch.float32)

    for field in ('valid', 'terminals', 'rewards', 'masks'):
        torch.testing.assert_close(batch[field], expected(field), msg=field)
    next_rows = expected('next_rows')
    torch.testing.assert_close(batch['next_observations'], torch.stack([100 + next_rows, 200 + next_rows], dim=-1))
    start_rows = torch.tensor(starts, dtype=torch.float32)
    torch.testing.assert_close(batch['observations'], torch.stack([start_rows, 10 + start_rows], dim=-1))
    # The raw action window runs on past episode ends.
    window = start_rows[:, None] + torch.arange(H)
    torch.testing.assert_close(batch['actions'], torch.stack([window / 10, -window / 10], dim=-1))


def test_batch_shapes_and_dtypes(buffer):
    batch = buffer.gather_chunks(torch.tensor([0, 3]), H, GAMMA)
    assert batch['observations'].shape == (2, 2)
    assert batch['actions'].shape == (2, H, 2)
    assert batch['next_observations'].shape == (2, H, 2)
    for key in ('rewards', 'masks', 'valid', 'terminals'):
        assert batch[key].shape == (2, H)
    assert all(value.dtype == torch.float32 for value in batch.values())


def test_horizon_one_is_a_plain_transition(buffer):
    batch = buffer.gather_chunks(torch.arange(9), 1, GAMMA)
    arrays = toy_arrays()
    assert torch.equal(batch['valid'], torch.ones(9, 1))
    torch.testing.assert_close(batch['rewards'][:, 0], torch.from_numpy(arrays['rewards']))
    torch.testing.assert_close(batch['masks'][:, 0], torch.from_numpy(arrays['masks']))
    torch.testing.assert_close(batch['next_observations'][:, 0], torch.from_numpy(arrays['next_observations']))


def test_gather_chunks_rejects_starts_past_the_last_full_window(buffer):
    with pytest.raises(IndexError, match=r'\[0, 6\]'):
        buffer.gather_chunks(torch.tensor([7]), H, GAMMA)
    with pytest.raises(ValueError, match='horizon'):
        buffer.gather_chunks(torch.tensor([0]), 10, GAMMA)


def test_sample_covers_exactly_the_full_windows_on_the_buffer_device(buffer):
    batch = buffer.sample(4096, H, GAMMA, torch.Generator().manual_seed(0))
    assert all(value.device == buffer.device for value in batch.values())
    starts = batch['observations'][:, 0].long()
    assert set(starts.tolist()) == set(range(0, 9 - H + 1))
    # Every sampled row equals the hand-checked gather at its start.
    reference = buffer.gather_chunks(starts, H, GAMMA)
    for key, value in batch.items():
        assert torch.equal(value, reference[key]), key


def test_sample_is_reproducible_with_a_seeded_generator(buffer):
    first = buffer.sample(64, H, GAMMA, torch.Generator().manual_seed(123))
    second = buffer.sample(64, H, GAMMA, torch.Generator().manual_seed(123))
    other = buffer.sample(64, H, GAMMA, torch.Generator().manual_seed(124))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first['observations'], other['observations'])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device to check device residency')
def test_sample_on_cuda_stays_on_cuda():
    buffer = ChunkReplayBuffer.from_arrays(toy_arrays(), device='cuda')
    batch = buffer.sample(32, H, GAMMA, torch.Generator(device='cuda').manual_seed(0))
    assert all(value.is_cuda for value in batch.values())
    reference = ChunkReplayBuffer.from_arrays(toy_arrays(), device='cpu')
    expected = reference.gather_chunks(batch['observations'][:, 0].long().cpu(), H, GAMMA)
    for key, value in batch.items():
        torch.testing.assert_close(value.cpu(), expected[key])
    with pytest.raises(ValueError, match='generator'):
        buffer.sample(4, H, GAMMA, torch.Generator())


def test_add_transitions_grows_size_and_errors_when_full():
    arrays = toy_arrays()
    buffer = ChunkReplayBuffer.from_arrays(arrays, device='cpu', capacity=11)
    assert (buffer.size, buffer.capacity) == (9, 11)
    online = {
        'observations': torch.tensor([[9.0, 19.0], [10.0, 20.0]]),
        'next_observations': np.array([[109.0, 209.0], [110.0, 210.0]], dtype=np.float64),  # cast to float32
        'actions': torch.zeros(2, 2),
        'rewards': torch.tensor([-1.0, 0.0]),
        'masks': torch.tensor([1.0, 0.0]),
        'terminals': torch.tensor([0.0, 1.0]),
    }
    buffer.add_transitions(**online)
    assert buffer.size == 11
    # The new rows are sampleable: the last full window now starts at 8, crossing from episode 3 into online data.
    batch = buffer.gather_chunks(torch.tensor([8]), H, GAMMA)
    torch.testing.assert_close(batch['valid'], torch.tensor([[1.0, 0.0, 0.0]]))
    batch = buffer.gather_chunks(torch.tensor([9]), 2, GAMMA)
    torch.testing.assert_close(batch['rewards'], torch.tensor([[-1.0, -1.0]]))
    torch.testing.assert_close(batch['masks'], torch.tensor([[1.0, 0.0]]))
    with pytest.raises(RuntimeError, match='full'):
        buffer.add_transitions(**{key: value[:1] for key, value in online.items()})
    assert buffer.size == 11


def test_construction_errors():
    arrays = toy_arrays()
    with pytest.raises(ValueError, match='capacity'):
        ChunkReplayBuffer.from_arrays(arrays, device='cpu', capacity=5)
    with pytest.raises(ValueError, match='keys'):
        ChunkReplayBuffer.from_arrays({k: v for k, v in arrays.items() if k != 'masks'}, device='cpu')
    with pytest.raises(ValueError, match="'rewards' has 8 rows"):
        ChunkReplayBuffer.from_arrays({**arrays, 'rewards': arrays['rewards'][:8]}, device='cpu')
    buffer = ChunkReplayBuffer.from_arrays(arrays, device='cpu', capacity=20)
    with pytest.raises(ValueError, match='per-transition shape'):
        buffer.add_transitions(**{**{k: v[:1] for k, v in arrays.items()}, 'actions': np.zeros((1, 3), np.float32)})
