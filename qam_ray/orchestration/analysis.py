"""Results tables and learning curves from MLflow runs, side by side with the paper's published numbers.

The protocol is the paper's (QAM_SPEC §11):
- a seed's score on a domain is its mean success over that domain's tasks;
- a domain's entry is the mean ± population std of those scores over seeds;
- the aggregate is the mean over domains, formed per seed before the statistics.

Success rates are reported in %.  Each trial run carries the tags ``method`` (a paper label), ``domain``,
``task``, ``seed`` and ``dataset_source``, and logs ``eval/success_rate`` with step = gradient steps.  The sweep's
parent run has no ``domain`` tag and is skipped.  Methods are compared in one table (a column per method, each
cell beside that method's published number) and one figure (a line per method with its seed spread).
"""

from __future__ import annotations

import importlib.resources

import pandas as pd

SUCCESS_METRIC = "eval/success_rate"
STAGES = ("offline_1M", "online_end_1.5M")
AGGREGATE = "all"


def published_results(stage: str = "offline_1M") -> pd.DataFrame:
    """The paper's numbers (12 seeds, computed from the authors' released curves), in %."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
    with importlib.resources.files("qam_ray.data").joinpath("qam_published_results.csv").open() as f:
        table = pd.read_csv(f)
    return table[table["stage"] == stage].drop(columns="stage")


def load_runs(experiment_names: list[str], tracking_uri: str | None = None, sweep: str | None = None) -> pd.DataFrame:
    """One row per trial run: method, domain, task, seed, dataset_source, dataset_size (1M / 100M), final
    success (%) and its step."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    filters = ["tags.domain != ''"]
    if sweep:
        filters.append(f"tags.sweep = '{sweep}'")
    runs = mlflow.search_runs(experiment_names=experiment_names, filter_string=" and ".join(filters))
    column = f"metrics.{SUCCESS_METRIC}"
    if runs.empty or column not in runs:
        return pd.DataFrame(columns=["run_id", "method", "domain", "task", "seed", "dataset_source", "dataset_size",
                                     "success", "step"])
    runs = runs.dropna(subset=[column])
    client = MlflowClient()
    steps = [max(m.step for m in client.get_metric_history(run_id, SUCCESS_METRIC)) for run_id in runs["run_id"]]
    return pd.DataFrame({
        "run_id": runs["run_id"].to_numpy(),
        "method": runs["tags.method"].to_numpy(),
        "domain": runs["tags.domain"].to_numpy(),
        "task": runs["tags.task"].astype(int).to_numpy(),
        "seed": runs["tags.seed"].astype(int).to_numpy(),
        "dataset_source": runs["tags.dataset_source"].to_numpy(),
        # Runs from before 100M support trained on the standard files.
        "dataset_size": (runs["tags.dataset_size"].fillna("1M") if "tags.dataset_size" in runs else "1M"),
        "success": 100.0 * runs[column].to_numpy(),
        "step": steps,
    })


def paper_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (method, domain) and the aggregate: mean and std over seeds, seeds, tasks, the smallest step and, for
    the aggregate, how many domains it covers (the paper's covers 10)."""
    runs = runs.assign(small_data=[size != "100M" and paper_dataset_size(domain) == "100M"
                                   for domain, size in zip(runs["domain"], runs["dataset_size"])])
    per_seed = (runs.groupby(["method", "domain", "seed"])
                .agg(score=("success", "mean"), tasks=("task", "nunique"), step=("step", "min"),
                     generated=("dataset_source", lambda s: bool((s == "generated").any())),
                     small_data=("small_data", "any"))
                .reset_index())
    aggregate = (per_seed.groupby(["method", "seed"])
                 .agg(score=("score", "mean"), tasks=("tasks", "sum"), step=("step", "min"),
                      generated=("generated", "any"), small_data=("small_data", "any"),
                      domains=("domain", "nunique"))
                 .reset_index().assign(domain=AGGREGATE))
    both = pd.concat([per_seed, aggregate], ignore_index=True)
    return (both.groupby(["method", "domain"])
            .agg(mean=("score", "mean"), std=("score", lambda s: s.std(ddof=0)), seeds=("seed", "nunique"),
                 tasks=("tasks", "max"), step=("step", "min"), generated=("generated", "any"),
                 small_data=("small_data", "any"), domains=("domains", "max"))
            .reset_index())


def paper_dataset_size(domain: str) -> str:
    """'100M' for the domains the paper trains on 100M shards, else '1M' (also for non-paper domains)."""
    from qam_ray.domains import DOMAIN_NAMES, get_domain

    return get_domain(domain).dataset_size if domain in DOMAIN_NAMES else "1M"


def compare_with_published(table: pd.DataFrame, stage: str = "offline_1M") -> pd.DataFrame:
    """Our table joined with the published numbers of the same method and domain (none for a method the paper
    does not report: its ``paper_*`` columns are empty)."""
    published = published_results(stage).rename(
        columns={"key": "domain", "mean": "paper_mean", "std": "paper_std", "n_seeds": "paper_seeds"})
    return table.merge(published, on=["method", "domain"], how="left")


def format_markdown(comparison: pd.DataFrame) -> str:
    """Rows = domains (aggregate last), columns = methods; each cell 'ours ± std (n) / paper ± std'."""
    def cell(row) -> str:
        scope = f", {int(row['domains'])} of 10 domains" if row["domain"] == AGGREGATE else ""
        ours = f"{row['mean']:.1f} ± {row['std']:.1f} ({row['seeds']} seeds, {row['step']:,} steps{scope})"
        if row["generated"]:
            ours += " [generated data]"
        if row["small_data"]:  # not comparable: the paper trained this domain on 100M transitions
            ours += " [1M data; paper: 100M]"
        paper = "not published" if pd.isna(row["paper_mean"]) else f"{row['paper_mean']:.1f} ± {row['paper_std']:.1f}"
        return f"{ours} / paper {paper}"

    cells = comparison.assign(cell=comparison.apply(cell, axis=1))
    wide = cells.pivot(index="domain", columns="method", values="cell")
    order = sorted(d for d in wide.index if d != AGGREGATE) + [d for d in wide.index if d == AGGREGATE]
    return wide.loc[order].fillna("").to_markdown()


def learning_curves(run_ids: list[str], tracking_uri: str | None = None) -> pd.DataFrame:
    """Every logged evaluation of the given runs: run_id, step, success (%)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    rows = [(run_id, m.step, 100.0 * m.value)
            for run_id in run_ids for m in client.get_metric_history(run_id, SUCCESS_METRIC)]
    return pd.DataFrame(rows, columns=["run_id", "step", "success"])


def seed_curves(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Per (method, domain, seed) and step: the mean success over the seed's tasks, at the steps every task of the
    seed evaluated (the paper's per-seed score, along the curve)."""
    data = curves.merge(runs[["run_id", "method", "domain", "seed", "task"]], on="run_id")
    tasks = data.groupby(["method", "domain", "seed"])["task"].transform("nunique")
    per_step = data.assign(tasks=tasks).groupby(["method", "domain", "seed", "step"])
    curve = per_step.agg(success=("success", "mean"), evaluated=("task", "nunique"), tasks=("tasks", "first"))
    return curve[curve["evaluated"] == curve["tasks"]].reset_index()[["method", "domain", "seed", "step", "success"]]


def plot_learning_curves(runs: pd.DataFrame, curves: pd.DataFrame, path: str) -> None:
    """One panel per domain, one colour per method: the mean over seeds ± the population std over seeds (band)
    and every seed's own curve (thin).  Panels on generated data say so in their title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_seed = seed_curves(runs, curves)
    domains = sorted(per_seed["domain"].unique())
    generated = set(runs.loc[runs["dataset_source"] == "generated", "domain"])
    colours = {m: f"C{i}" for i, m in enumerate(sorted(per_seed["method"].unique()))}
    fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.4), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for method, group in per_seed[per_seed["domain"] == domain].groupby("method"):
            colour = colours[method]
            for _, seed in group.groupby("seed"):
                ax.plot(seed["step"], seed["success"], color=colour, alpha=0.3, linewidth=0.8)
            stats = group.groupby("step")["success"].agg(mean="mean", std=lambda s: s.std(ddof=0), seeds="count")
            ax.plot(stats.index, stats["mean"], color=colour, marker="o", markersize=3,
                    label=f"{method} ({int(stats['seeds'].max())} seeds)")
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], color=colour,
                            alpha=0.2, linewidth=0)
        ax.set(title=domain + (" [generated data]" if domain in generated else ""), xlabel="gradient steps",
               ylabel="success rate (%)", ylim=(-2, 102))
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_comparison(comparison: pd.DataFrame, path: str) -> None:
    """Bars per domain (aggregate last): for each method ours (mean ± std over seeds) beside the paper's, hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains = sorted(d for d in comparison["domain"].unique() if d != AGGREGATE) + [AGGREGATE]
    domains = [d for d in domains if d in set(comparison["domain"])]
    methods = sorted(comparison["method"].unique())
    width = 0.8 / (2 * len(methods))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(domains) * len(methods)), 3.6))
    rows = comparison.set_index(["method", "domain"])
    for i, method in enumerate(methods):
        for j, (kind, column, error) in enumerate((("ours", "mean", "std"), ("paper", "paper_mean", "paper_std"))):
            values = [rows.loc[(method, d), column] if (method, d) in rows.index else np.nan for d in domains]
            errors = [rows.loc[(method, d), error] if (method, d) in rows.index else np.nan for d in domains]
            offsets = np.arange(len(domains)) + (2 * i + j - len(methods) + 0.5) * width
            ax.bar(offsets, values, width, yerr=errors, color=f"C{i}", hatch="//" if kind == "paper" else None,
                   alpha=0.55 if kind == "paper" else 0.9, label=f"{method} ({kind})", capsize=2)
    generated = set(comparison.loc[comparison["generated"], "domain"])
    ax.set_xticks(np.arange(len(domains)), [d + ("\n[generated data]" if d in generated else "") for d in domains],
                  fontsize="small")
    ax.set(ylabel="success rate (%)", ylim=(0, 102), title="ours vs published (mean ± std over seeds)")
    ax.legend(fontsize="x-small", ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


REPORT_FILES = ("table.md", "table.csv", "learning_curves.png", "comparison.png")


def write_report(runs: pd.DataFrame, out: str, stage: str, tracking_uri: str | None = None) -> tuple[str, pd.DataFrame]:
    """The comparison table (markdown, CSV), the learning curves and the comparison bars of ``runs`` into ``out``;
    returns the markdown table and the comparison frame."""
    import os

    comparison = compare_with_published(paper_table(runs), stage)
    os.makedirs(out, exist_ok=True)
    markdown = format_markdown(comparison)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"Success rate (%), ours vs published ({stage}); {len(runs)} runs.\n\n{markdown}\n")
    comparison.to_csv(os.path.join(out, "table.csv"), index=False)
    plot_learning_curves(runs, learning_curves(list(runs["run_id"]), tracking_uri),
                         os.path.join(out, "learning_curves.png"))
    plot_comparison(comparison, os.path.join(out, "comparison.png"))
    return markdown, comparison


def summary_metrics(comparison: pd.DataFrame) -> dict[str, float]:
    """Per method, the aggregate's mean and std over seeds of the final success: what a sweep's parent run logs."""
    rows = comparison[comparison["domain"] == AGGREGATE]
    return {f"{row.method}/final_success_{stat}": float(getattr(row, stat)) for row in rows.itertuples()
            for stat in ("mean", "std")}
