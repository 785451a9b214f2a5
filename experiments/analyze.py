"""Compare methods from MLflow runs in the paper's results table, side by side with the published numbers.

    python experiments/analyze.py --experiment qam_ray --sweep my-sweep --stage offline_1M --out results/analysis

Writes table.md (domains × methods, "ours mean ± std (seeds, steps) / paper mean ± std"), table.csv (long
form), learning_curves.png (per domain, a line per method: mean over seeds, ± std band, each seed thin) and
comparison.png (bars: ours beside the published numbers).  Runs on generated data are marked.  The tracking URI is --tracking-uri, else
MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (the sweep's default).

When some runs have an online phase (offline→online sweeps), also the SMAC paper's transfer metrics: transfer.md
and transfer.csv (per method × domain: drop and normalised regret, mean ± std over seeds; see
qam_ray.orchestration.analysis.transfer_metrics for the formulas), transfer_runs.csv (per run) and
transfer_curves.png (curves aligned at the hand-off: x = env steps since it, negative = offline).
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import qam_ray  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qam_ray.orchestration.analysis import STAGES, load_runs, write_report, write_transfer_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI")
                   or f"sqlite:///{os.path.abspath('mlflow.db')}")
    p.add_argument("--experiment", action="append", default=None, help="MLflow experiment name (repeatable)")
    p.add_argument("--sweep", default=None, help="only runs tagged with this sweep name")
    p.add_argument("--stage", choices=STAGES, default="offline_1M", help="which published numbers to compare with")
    p.add_argument("--out", default="results/analysis")
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    p, args = parse_args(argv)
    experiments = args.experiment or ["qam_ray"]
    runs = load_runs(experiments, args.tracking_uri, args.sweep)
    if runs.empty:
        raise SystemExit(f"no trial runs with {'eval/success_rate'} in experiments {experiments} at {args.tracking_uri}"
                         + (f" for sweep {args.sweep!r}" if args.sweep else ""))
    markdown, _ = write_report(runs, args.out, args.stage, args.tracking_uri)
    print(markdown)
    print(f"\ntable: {args.out}/table.md (and table.csv)\nlearning curves: {args.out}/learning_curves.png"
          f"\ncomparison with the paper: {args.out}/comparison.png")
    transfer = write_transfer_report(runs, args.out, args.tracking_uri)
    if transfer is not None:
        print(f"\nOffline→online transfer (mean ± std over seeds):\n{transfer}\n\ntransfer table: "
              f"{args.out}/transfer.md (and transfer.csv, per run transfer_runs.csv)\n"
              f"aligned curves: {args.out}/transfer_curves.png")
    print(mlflow_ui_hint(args.tracking_uri, experiments[0], args.sweep))
    return 0


def mlflow_ui_hint(tracking_uri: str, experiment: str, sweep: str | None = None) -> str:
    """The one command (or address) that shows the runs in the MLflow UI, filtered to ``sweep``."""
    import urllib.parse

    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    page = f"#/experiments/{found.experiment_id}" if found else ""
    if found and sweep:
        page += "?" + urllib.parse.urlencode({"searchFilter": f"tags.sweep = '{sweep}'"})
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {tracking_uri.rstrip('/')}/{page}"
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return (f"MLflow UI: {mlflow_bin} ui --backend-store-uri {tracking_uri} --port 5000, "
            f"then open http://127.0.0.1:5000/{page}")


if __name__ == "__main__":
    sys.exit(main())
