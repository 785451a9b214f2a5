"""Results tables and learning curves from MLflow runs, side by side with the paper's published numbers.

The protocol is the paper's (QAM_SPEC §11):
- a seed's score on a domain is its mean success over that domain's tasks;
- a domain's entry is the mean ± population std of those scores over seeds;
- the aggregate is the mean over domains, formed per seed before the statistics.

Success rates are reported in %.  Each trial run carries the tags ``method`` (a paper label), ``domain``,
``task``, ``seed`` and ``dataset_source``, and logs ``eval/success_rate`` with step = gradient steps.  The sweep's
parent run has no ``domain`` tag and is skipped.  Methods are compared in one table (a column per method, each
cell beside that method's published number) and one figure (a line per method with its seed spread).

Runs with an online phase (param ``online_steps`` > 0; step = offline gradient steps + env steps online) also get
the SMAC paper's transfer metrics, for every method: the drop at the hand-off and the min-max normalised regret
of the online phase (``transfer_metrics``), the same per-seed protocol (``transfer_table``) and curves aligned at
the hand-off (``plot_transfer_curves``).
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


# --- Offline→online transfer (SEED_METHODS §3.3: the SMAC paper's drop and normalised regret, for every method) ---

ONLINE_ENV_STEPS_METRIC = "online/env_steps"
TRANSFER_FILES = ("transfer.md", "transfer.csv", "transfer_runs.csv", "transfer_curves.png")
TRANSFER_STATS = ("offline_final", "online_final", "drop", "regret", "normalised_regret")


def handoff_steps(runs: pd.DataFrame, tracking_uri: str | None = None) -> pd.DataFrame:
    """run_id and hand-off step of the runs with an online phase (param ``online_steps`` > 0); the others are left
    out.  The hand-off is the learner's gradient steps when the online phase began: every online row logs
    ``online/env_steps`` at step = hand-off + env steps, so it is read back from there (it exceeds the ``steps``
    param when ``steps`` is not a multiple of ``steps_per_iteration``); param ``steps`` where nothing online was
    logged yet."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    rows = []
    for run_id in runs["run_id"]:
        params = client.get_run(run_id).data.params
        if int(float(params.get("online_steps", 0))) <= 0:
            continue
        env_steps = client.get_metric_history(run_id, ONLINE_ENV_STEPS_METRIC)
        handoff = min(m.step - int(m.value) for m in env_steps) if env_steps else int(float(params["steps"]))
        rows.append((run_id, handoff))
    return pd.DataFrame(rows, columns=["run_id", "handoff"])


def transfer_metrics(runs: pd.DataFrame, curves: pd.DataFrame, handoffs: pd.DataFrame) -> pd.DataFrame:
    """Per run with an online phase: the SMAC paper's drop and regret of its offline→online curve (success in %).

    With H the hand-off step (``handoff_steps``):
    - ``offline_final`` s₀ = the last evaluation at step ≤ H (the offline policy the online phase starts from);
    - the online curve s₀, s₁ … s_N: the hand-off evaluation s₀ counts as its first point (online time 0, the
      policy before any online update), followed by the N evaluations at steps > H;
    - ``drop`` = s₀ − min(s₀ … s_N) ≥ 0, in percentage points: 0 means no drop (the curve never goes below the
      hand-off value, also when the hand-off is its minimum);
    - ``regret`` = mean over i = 0 … N of (best − sᵢ) = best − mean(s₀ … s_N), with best = the highest evaluation
      on that (domain, task) in any of the online runs given (their offline part included);
    - ``normalised_regret`` = (regret − min regret) / (max regret − min regret), min and max over every online run
      of the same (domain, task) given here (all methods and seeds), so 0 = the least regret and 1 = the most:
      the paper's min-max normalisation per task.  It equals (max m − m) / (max m − min m) with m the mean
      online success, whatever task-level best is used.  NaN when the task has one run or equal regrets.
      The paper normalises over its own 4 offline × 4 online algorithms per environment, and its exact reference
      for "best" is not in the stored material (SEED_METHODS §3.3, no PDF): here the set is the runs analysed
      together, so normalised regrets compare only within one analysis (the raw ``regret`` is absolute).

    Runs without an online phase, or without an online evaluation yet, are skipped (not zero).  A run without an
    evaluation at or before H (online only: ``steps`` 0 or a method without offline data; a fine-tune run started
    from a checkpoint file) has ``offline_final`` and ``drop`` NaN and its online curve starts at s₁.
    """
    meta = runs[["run_id", "method", "domain", "task", "seed"]]
    data = curves.merge(handoffs, on="run_id").merge(meta, on="run_id")
    best = data.groupby(["domain", "task"])["success"].max()
    rows = []
    for run_id, curve in data.groupby("run_id"):
        curve = curve.sort_values("step")
        handoff = curve["handoff"].iloc[0]
        offline, online = curve[curve["step"] <= handoff], curve[curve["step"] > handoff]
        if online.empty:
            continue
        start = offline["success"].iloc[-1] if len(offline) else float("nan")
        online_curve = pd.concat([offline["success"].iloc[-1:], online["success"]])
        first = curve.iloc[0]
        rows.append({"run_id": run_id, "method": first["method"], "domain": first["domain"], "task": first["task"],
                     "seed": first["seed"], "handoff": handoff, "online_evaluations": len(online),
                     "offline_final": start, "online_min": online_curve.min(),
                     "online_final": online["success"].iloc[-1], "drop": start - online_curve.min(),
                     "regret": best[(first["domain"], first["task"])] - online_curve.mean()})
    columns = ["run_id", "method", "domain", "task", "seed", "handoff", "online_evaluations", "offline_final",
               "online_min", "online_final", "drop", "regret", "normalised_regret"]
    if not rows:
        return pd.DataFrame(columns=columns)
    per_run = pd.DataFrame(rows)
    by_task = per_run.groupby(["domain", "task"])["regret"]
    low, high = by_task.transform("min"), by_task.transform("max")
    per_run["normalised_regret"] = ((per_run["regret"] - low) / (high - low)).where(high > low)
    return per_run[columns]


def transfer_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per (method, domain) and the aggregate over domains, with ``paper_table``'s protocol: a seed's value is its
    mean over the domain's tasks (then over domains for the aggregate), reported as mean and population std over
    seeds of each of ``TRANSFER_STATS`` (NaN values, where a statistic is undefined, are left out of the means);
    ``runs`` counts runs, ``with_drop`` those with a defined drop and ``dropped`` those with drop > 0."""
    stats = {s: (s, "mean") for s in TRANSFER_STATS}
    counts = ("runs", "with_drop", "dropped")
    per_seed = (per_run.assign(runs=1, with_drop=per_run["drop"].notna(), dropped=per_run["drop"] > 0)
                .groupby(["method", "domain", "seed"])
                .agg(**stats, **{c: (c, "sum") for c in counts}).reset_index())
    aggregate = (per_seed.groupby(["method", "seed"])
                 .agg(**stats, **{c: (c, "sum") for c in counts}).reset_index().assign(domain=AGGREGATE))
    both = pd.concat([per_seed, aggregate], ignore_index=True)
    spread = {f"{s}_{k}": (s, f) for s in TRANSFER_STATS for k, f in (("mean", "mean"),
                                                                       ("std", lambda v: v.std(ddof=0)))}
    table = (both.groupby(["method", "domain"])
             .agg(seeds=("seed", "nunique"), **{c: (c, "sum") for c in counts}, **spread).reset_index())
    last = table["domain"] == AGGREGATE
    return (table.assign(last=last).sort_values(["last", "domain", "method"]).drop(columns="last")
            .reset_index(drop=True))


def format_transfer_markdown(table: pd.DataFrame) -> str:
    """One row per (domain, method), aggregate last: each statistic as 'mean ± std' over seeds."""
    def pm(row, stat: str, digits: int) -> str:
        mean, std = row[f"{stat}_mean"], row[f"{stat}_std"]
        return "n/a" if pd.isna(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"

    rows = [{"domain": row["domain"], "method": row["method"], "seeds": int(row["seeds"]),
             "runs": int(row["runs"]), "runs dropped": f"{int(row['dropped'])}/{int(row['with_drop'])}",
             "offline final (%)": pm(row, "offline_final", 1), "online final (%)": pm(row, "online_final", 1),
             "drop (pts)": pm(row, "drop", 1), "regret (pts)": pm(row, "regret", 1),
             "normalised regret": pm(row, "normalised_regret", 3)} for _, row in table.iterrows()]
    return pd.DataFrame(rows).to_markdown(index=False)


def aligned_curves(curves: pd.DataFrame, handoffs: pd.DataFrame) -> pd.DataFrame:
    """``curves`` of the runs in ``handoffs`` with step = steps since the hand-off: env steps online (> 0), minus
    the offline gradient steps still to go before it (≤ 0)."""
    data = curves.merge(handoffs, on="run_id")
    return data.assign(step=data["step"] - data["handoff"]).drop(columns="handoff")


def plot_transfer_curves(runs: pd.DataFrame, curves: pd.DataFrame, handoffs: pd.DataFrame, path: str) -> None:
    """One panel per domain, one colour per method: offline→online curves aligned at the hand-off (x = 0, dashed),
    the mean over seeds (each seed's mean over tasks, ``seed_curves``) ± the population std over seeds (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_seed = seed_curves(runs[runs["run_id"].isin(handoffs["run_id"])], aligned_curves(curves, handoffs))
    domains = sorted(per_seed["domain"].unique())
    colours = {m: f"C{i}" for i, m in enumerate(sorted(per_seed["method"].unique()))}
    fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.4), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for method, group in per_seed[per_seed["domain"] == domain].groupby("method"):
            stats = group.groupby("step")["success"].agg(mean="mean", std=lambda s: s.std(ddof=0), seeds="count")
            ax.plot(stats.index, stats["mean"], color=colours[method], marker="o", markersize=3,
                    label=f"{method} ({int(stats['seeds'].max())} seeds)")
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                            color=colours[method], alpha=0.2, linewidth=0)
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        ax.set(title=f"{domain}: offline → online", ylabel="success rate (%)", ylim=(-2, 102),
               xlabel="env steps since hand-off (< 0: offline gradient steps)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_transfer_metrics(runs: pd.DataFrame, tracking_uri: str | None = None
                         ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``transfer_metrics`` of ``runs`` read from MLflow, with the curves and hand-offs of the runs it covers."""
    handoffs = handoff_steps(runs, tracking_uri)
    curves = learning_curves(list(handoffs["run_id"]), tracking_uri)
    per_run = transfer_metrics(runs, curves, handoffs)
    return per_run, curves, handoffs[handoffs["run_id"].isin(per_run["run_id"])]


TRANSFER_RUN_METRICS = ("drop", "regret", "normalised_regret")


def log_transfer_metrics(per_run: pd.DataFrame, tracking_uri: str | None = None) -> None:
    """Each run's drop and regrets as ``transfer/<name>`` metrics of its own MLflow run (undefined ones left out),
    at the run's last evaluation step, so the MLflow table shows them beside the run's success."""
    import math
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, now = MlflowClient(tracking_uri), int(time.time() * 1000)
    for row in per_run.itertuples():
        step = max(m.step for m in client.get_metric_history(row.run_id, SUCCESS_METRIC))
        metrics = [Metric(f"transfer/{name}", float(getattr(row, name)), now, step)
                   for name in TRANSFER_RUN_METRICS if not math.isnan(getattr(row, name))]
        client.log_batch(row.run_id, metrics=metrics)


def write_transfer_report(runs: pd.DataFrame, out: str, tracking_uri: str | None = None) -> str | None:
    """When ``runs`` has online runs: the transfer table (transfer.md, transfer.csv), the per-run metrics
    (transfer_runs.csv) and the aligned curves (transfer_curves.png) into ``out``; returns the markdown table, or
    None (and writes nothing) when no run has an online evaluation."""
    import os

    per_run, curves, handoffs = run_transfer_metrics(runs, tracking_uri)
    if per_run.empty:
        return None
    table = transfer_table(per_run)
    markdown = format_transfer_markdown(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "transfer.md"), "w") as f:
        f.write(f"Offline→online transfer; {len(per_run)} runs with an online phase.  drop = offline final − min of "
                "the online curve (hand-off evaluation included), in points; regret = mean over the online curve of "
                "(best on the task − success); normalised regret min-max per task over these runs (0 best, 1 "
                f"worst).  Mean ± std over seeds.\n\n{markdown}\n")
    table.to_csv(os.path.join(out, "transfer.csv"), index=False)
    per_run.to_csv(os.path.join(out, "transfer_runs.csv"), index=False)
    plot_transfer_curves(runs, curves, handoffs, os.path.join(out, "transfer_curves.png"))
    return markdown
