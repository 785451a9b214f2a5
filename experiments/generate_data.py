"""Generate an OGBench dataset offline: manipulation with the oracles that ship in the ogbench package, locomotion
(antmaze / humanoidmaze navigate) with a scripted random walk of the real env (format-valid, not expert data).

Examples (from the repo root):
    python experiments/generate_data.py --env cube-double --type play --episodes 100 --seed 0 --out data/ogbench
    python experiments/generate_data.py --env antmaze-large --type navigate --episodes 2 --seed 0 --out data/ogbench
    python experiments/generate_data.py --env puzzle-4x4 --type play --episodes 10 --shards 4 --out data/ogbench

The files are written in the official format next to a manifest that marks them as generated, so they load with
``ogbench.make_env_and_datasets(..., dataset_dir=OUT)`` without any download.  With ``--shards K`` it writes a
100M-style folder ``OUT/<env>-<type>-100m-v0/`` of K shards of ``--episodes`` episodes each instead (train on it with
``--dataset-size 100M``, or the paper presets' ``--dataset-size paper`` for cube-quadruple and puzzle-4x4).
"""

import argparse
import sys
from pathlib import Path

try:
    import qam_ray  # noqa: F401
except ImportError:  # Run from a checkout without installing the package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qam_ray.data.generate import DATASET_TYPES, SUPPORTED_ENVS, generate_dataset, generate_shards


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--env', required=True, help=f'one of: {", ".join(SUPPORTED_ENVS)}')
    parser.add_argument('--type', required=True, dest='dataset_type', help=f'one of: {", ".join(DATASET_TYPES)}')
    parser.add_argument('--episodes', type=int, required=True, help='train episodes; val gets max(1, N//10) more')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', required=True, help='output directory (pass it as dataset_dir to ogbench)')
    parser.add_argument('--workers', type=int, default=1, help='worker processes (the output does not depend on it)')
    parser.add_argument('--episode-length', type=int, default=None,
                        help='rows per episode (default: the official files\', 1001; 2001/4001 humanoid and giant)')
    parser.add_argument('--shards', type=int, default=None,
                        help='write a 100M-style shard folder of this many shards of --episodes episodes each')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.shards is not None:
        try:
            result = generate_shards(args.env, args.dataset_type, args.shards, args.episodes, args.seed, args.out,
                                     args.episode_length, args.workers)
        except ValueError as error:
            sys.exit(f'error: {error}')
        rows = sum(shard['train_rows'] for shard in result['shards'])
        print(f'shards:   {result["folder"]}/ ({args.shards} shards, {rows} rows in all)')
        print(f'train on it with --dataset-dir {args.out} --dataset-size 100M')
        return
    try:
        result = generate_dataset(
            env=args.env,
            dataset_type=args.dataset_type,
            episodes=args.episodes,
            seed=args.seed,
            out_dir=args.out,
            episode_length=args.episode_length,
            workers=args.workers,
        )
    except ValueError as error:
        sys.exit(f'error: {error}')

    print(f'train:    {result["train_path"]} ({result["train_rows"]} rows)')
    print(f'val:      {result["val_path"]} ({result["val_rows"]} rows)')
    print(f'manifest: {result["manifest_path"]}')
    print(f'{result["episodes"] + result["val_episodes"]} episodes in {result["seconds"]:.1f} s')
    out_dir = str(Path(result['train_path']).parent)
    print('load with:')
    print(
        f"  ogbench.make_env_and_datasets('{args.env}-{args.dataset_type}-singletask-task1-v0', "
        f"dataset_dir='{out_dir}')"
    )


if __name__ == '__main__':
    main()
