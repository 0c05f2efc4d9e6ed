"""Comparing runs (researchlab.tracking.compare) on a real sqlite MLflow store: find_runs's DataFrame (numeric params,
filters, a parent's children, clear errors), the metric histories, and plot_runs's mean ± spread per group."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest

from researchlab.tracking.compare import default_groups, find_runs, group_stats, plot_runs, run_histories

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    "lr in {1e-3, 1e-2} x seed in {0, 1, 2}, children of one parent run, plus a run outside the sweep; `(uri, parent)`."
    from mlflow import MlflowClient
    sqlite_uri = f"sqlite:///{tmp_path_factory.mktemp('sweep') / 'mlflow.db'}"  # one store for the module's tests
    client = MlflowClient(tracking_uri=sqlite_uri)
    exp = client.create_experiment("lr-sweep")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    for lr in (1e-3, 1e-2):
        for seed in range(3):
            run_id = client.create_run(exp, run_name=f"lr={lr},seed={seed}",
                                       tags={"mlflow.parentRunId": parent}).info.run_id
            for k, v in {"lr": lr, "seed": seed, "env": "CartPole-v1", "anneal": True}.items():
                client.log_param(run_id, k, v)
            for step in (10, 20, 30):
                client.log_metric(run_id, "return", 100 * lr * step + seed, step=step)
            client.set_terminated(run_id)
    other = client.create_run(exp, run_name="alone").info.run_id
    client.log_metric(other, "return", 1.0, step=10)
    return sqlite_uri, parent


def test_find_runs_is_search_runs_with_numeric_params(sweep: tuple[str, str]) -> None:
    uri, parent = sweep
    runs = find_runs("lr-sweep", parent=parent, tracking_uri=uri)
    assert len(runs) == 6 and set(runs["tags.mlflow.parentRunId"]) == {parent}
    assert runs["params.lr"].dtype.kind == "f" and runs["params.seed"].dtype.kind == "i"
    assert set(runs["params.anneal"]) == {"True"} and set(runs["params.env"]) == {"CartPole-v1"}
    assert runs.loc[runs["metrics.return"].idxmax(), "run_name"] == "lr=0.01,seed=2"  # final (last) values
    assert len(find_runs("lr-sweep", tracking_uri=uri)) == 8  # with the parent and the run outside
    assert len(find_runs("lr-sweep", "params.lr = '0.01'", parent=parent, tracking_uri=uri)) == 3
    best = find_runs("lr-sweep", parent=parent, order_by=["metrics.return DESC"], tracking_uri=uri)
    assert list(best["metrics.return"])[:2] == [32.0, 31.0]


def test_find_runs_names_an_unknown_experiment(sweep: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match=r"no experiment 'lr-swep' in sqlite.*experiments are \['Default', 'lr-sweep'\]"):
        find_runs("lr-swep", tracking_uri=sweep[0])


def test_find_runs_leaves_the_tracking_uri_as_it_was(sweep: tuple[str, str], tmp_path: Path) -> None:
    import mlflow
    other = f"sqlite:///{tmp_path / 'other.db'}"
    mlflow.set_tracking_uri(other)
    try:
        find_runs("lr-sweep", tracking_uri=sweep[0])
        assert mlflow.get_tracking_uri() == other
    finally:
        mlflow.set_tracking_uri(None)


def test_histories_and_group_bands(sweep: tuple[str, str]) -> None:
    uri, parent = sweep
    runs = find_runs("lr-sweep", parent=parent, tracking_uri=uri)
    hist = run_histories(runs, "metrics.return", tracking_uri=uri)
    assert hist.shape == (3, 6) and list(hist.index) == [10, 20, 30]
    assert default_groups(runs) == ["params.lr"]
    stats = group_stats(runs, "return", tracking_uri=uri)
    row = stats[(stats["params.lr"] == 1e-2) & (stats["step"] == 20)].iloc[0]
    values = [100 * 1e-2 * 20 + s for s in range(3)]
    assert np.isclose(row["mean"], np.mean(values)) and row["runs"] == 3
    assert np.isclose(row["high"] - row["mean"], np.std(values, ddof=1))
    rng = group_stats(runs, "return", spread="range", tracking_uri=uri)
    row = rng[(rng["params.lr"] == 1e-3) & (rng["step"] == 30)].iloc[0]
    assert (row["low"], row["high"]) == (3.0, 5.0)
    with pytest.raises(ValueError, match="spread must be"):
        group_stats(runs, "return", spread="iqr", tracking_uri=uri)
    with pytest.raises(KeyError, match=r"no run has a metric 'retrun'; the runs have \['return'\]"):
        run_histories(runs, "retrun", tracking_uri=uri)


def test_plot_runs_draws_a_mean_and_a_band_per_group(sweep: tuple[str, str]) -> None:
    uri, parent = sweep
    runs = find_runs("lr-sweep", parent=parent, tracking_uri=uri)
    ax = plot_runs(runs, "return", tracking_uri=uri)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lr=0.001 (n=3)", "lr=0.01 (n=3)"]
    means = [list(line.get_ydata()) for line in ax.get_lines()]
    assert np.allclose(means[1], [100 * 1e-2 * s + 1 for s in (10, 20, 30)])
    assert len(ax.collections) == 2  # the bands
    one = plot_runs(runs, "return", group_by=[], tracking_uri=uri)
    assert [t.get_text() for t in one.get_legend().get_texts()] == ["all runs (n=6)"]
