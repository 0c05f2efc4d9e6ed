"""Populations (researchlab.design.population) on PPO CartPole: member i of a population is the same seed run
alone (bit for bit with `vectorize=False`, to float32 rounding with vmap), checkpoint + resume of the whole
population is bit-exact, child runs with the right params and metrics land in a real MLflow store, and a field
that cannot differ per member is refused before anything runs."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from researchlab.design.core import Clock, Config, State
from researchlab.design.data import NoBatch
from researchlab.design.loop import Loop
from researchlab.design.population import PopulationLoop, PopulationTelemetry, mlflow_population
from researchlab.examples.ppo import PPOConfig, init_ppo, ppo_step

SMALL = dict(num_envs=4, num_steps=16, total_steps=4 * 16 * 50, update_epochs=2, num_minibatches=2)
STEPS = 4


def _leaves(state: object) -> list[np.ndarray]:
    "Every leaf as a host array (typed keys as their key data), for bit-for-bit comparisons."
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree_util.tree_leaves(state)]


def _same_bits(a: object, b: object) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def _solo(config: PPOConfig, steps: int = STEPS) -> Loop:
    loop = Loop(config, init_ppo(config), ppo_step, NoBatch(), progress=False, log_every=1)
    loop.run(steps)
    return loop


@pytest.mark.parametrize("changes", [{}, {"lr": 1e-3}], ids=["seeds", "seeds+lr"])
def test_member_equals_the_same_run_alone_bit_for_bit(changes: dict) -> None:
    configs = [PPOConfig(seed=s, **SMALL) for s in range(3)]
    configs[1] = configs[1].model_copy(update=changes) if changes else configs[1]
    pop = PopulationLoop(configs, init_ppo, ppo_step, vectorize=False, progress=False, log_every=1)
    pop.run(STEPS)
    for i in (1, 2):
        alone = _solo(configs[i])
        member = pop.member(i)
        assert _same_bits(member.state, alone.state), f"member {i} differs from its run alone"
        assert member.history == alone.history
        assert member.config == configs[i]


def test_vmapped_member_matches_the_run_alone_to_float32_rounding() -> None:
    configs = [PPOConfig(seed=s, **SMALL) for s in range(3)]
    pop = PopulationLoop(configs, init_ppo, ppo_step, progress=False, log_every=1)
    pop.run(STEPS)
    alone = _solo(configs[2])
    for x, y in zip(_leaves(pop.member(2).state), _leaves(alone.state)):
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(x, y)


def test_checkpoint_and_resume_of_the_whole_population_is_bit_exact(tmp_path: Path) -> None:
    configs = [PPOConfig(seed=s, lr=lr, **SMALL) for s, lr in [(0, 2.5e-4), (1, 1e-3), (2, 5e-4)]]
    straight = PopulationLoop(configs, init_ppo, ppo_step, progress=False, log_every=1)
    straight.run(STEPS)
    first = PopulationLoop(configs, init_ppo, ppo_step, progress=False, log_every=1, checkpoint_dir=tmp_path / "c")
    first.run(STEPS // 2)
    resumed = PopulationLoop.resume(tmp_path / "c", ppo_step, like=[init_ppo(c) for c in configs], config=PPOConfig,
                                    progress=False, log_every=1)
    assert resumed.step_count == STEPS // 2 and resumed.config == first.config
    resumed.run(STEPS - STEPS // 2)
    assert _same_bits(resumed.state, straight.state)
    assert resumed.history == straight.history[STEPS // 2:]
    assert resumed.member(1).config.lr == 1e-3


def test_one_child_run_per_member_in_a_real_mlflow_store(sqlite_uri: str) -> None:
    from mlflow import MlflowClient
    configs = [PPOConfig(seed=s, lr=lr, **SMALL) for s, lr in [(0, 2.5e-4), (1, 1e-3), (2, 5e-4)]]
    telemetry = mlflow_population(3, experiment="pop", run_name="ppo-pop", tracking_uri=sqlite_uri, interval=0.1)
    pop = PopulationLoop(configs, init_ppo, ppo_step, telemetry=telemetry, progress=False, log_every=2)
    pop.run(STEPS)
    pop.close()
    client = MlflowClient(tracking_uri=sqlite_uri)
    parent = client.get_run(telemetry.parent.run_id)
    assert parent.data.params["population.size"] == "3"
    assert parent.data.params["population.varying"] == "lr,seed"
    assert parent.data.params["num_envs"] == "4" and "lr" not in parent.data.params
    assert parent.info.status == "FINISHED"
    exp = client.get_experiment_by_name("pop")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    by_member = {int(r.data.tags["rlab.population.member"]): r for r in children}
    for i, c in enumerate(configs):
        run = by_member[i]
        assert run.info.run_name == f"ppo-pop/member-{i}" and run.info.status == "FINISHED"
        assert (float(run.data.params["lr"]), int(run.data.params["seed"])) == (c.lr, c.seed)
        history = client.get_metric_history(run.info.run_id, "policy_loss")
        expected = [(r["step"], r["policy_loss"]) for r in pop.member_history(i)]
        assert [(m.step, m.value) for m in history] == expected
    means = client.get_metric_history(parent.info.run_id, "episode_return")
    assert [m.step for m in means] == [2, 4]


def test_a_field_that_changes_shapes_or_trace_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"differ in num_envs.*cannot differ within a population"):
        PopulationLoop([PPOConfig(**SMALL), PPOConfig(**{**SMALL, "num_envs": 8})], init_ppo, ppo_step)
    with pytest.raises(ValueError, match=r"the members differ in 'update_epochs' \(2, 4\).*fixed Python value"):
        PopulationLoop([PPOConfig(**SMALL), PPOConfig(**{**SMALL, "update_epochs": 4})], init_ppo, ppo_step,
                       checkpoint_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match=r"differ in 'anneal_lr'.*not an int or float field"):
        PopulationLoop([PPOConfig(**SMALL), PPOConfig(**{**SMALL, "anneal_lr": False})], init_ppo, ppo_step)


class _Cfg(Config):
    lr: float = 0.1


class _St(State):
    w: jax.Array
    clock: Clock


def _step(state: _St, config: _Cfg, batch: object) -> tuple[_St, dict]:
    return _St(state.w * config.lr, state.clock), {"x/3": state.w.sum()}


def test_a_metric_named_like_a_member_key_is_refused() -> None:
    with pytest.raises(ValueError, match=r"metric 'x/3'.*rename it"):
        PopulationLoop([_Cfg(), _Cfg(lr=0.2)], lambda c: _St(jnp.ones(2), Clock()), _step)


def test_population_telemetry_routes_member_keys_and_refuses_nothing_else() -> None:
    class Rec(PopulationTelemetry):  # a PopulationTelemetry is itself a Telemetry: nest one as a recorder
        def __init__(self) -> None:
            super().__init__([])
            self.seen: list = []

        def log_metrics(self, metrics: dict, step: int) -> None:
            self.seen.append((step, dict(metrics)))

    kids, parent = [Rec(), Rec()], Rec()
    t = PopulationTelemetry(kids, parent)
    t.log_metrics({"loss": 1.0, "loss/0": 2.0, "loss/1": 3.0, "loss/7": 4.0}, 5)
    assert kids[0].seen == [(5, {"loss": 2.0})] and kids[1].seen == [(5, {"loss": 3.0})]
    assert parent.seen == [(5, {"loss": 1.0, "loss/7": 4.0})]  # no member 7: kept whole, for the parent
