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


CONFIGS = [PPOConfig(seed=0, **SMALL), PPOConfig(seed=1, lr=1e-3, **SMALL), PPOConfig(seed=2, **SMALL)]


@pytest.fixture(scope="module")
def alone() -> dict[int, Loop]:
    "Members 1 (its own learning rate) and 2 of CONFIGS, each run alone by an ordinary Loop."
    return {i: _solo(CONFIGS[i]) for i in (1, 2)}


@pytest.fixture(scope="module")
def vmapped(tmp_path_factory: pytest.TempPathFactory) -> tuple[PopulationLoop, Path]:
    "A vmapped population run STEPS steps, checkpointed half way; returns it and a copy of that checkpoint folder."
    import shutil
    folder = tmp_path_factory.mktemp("pop")
    pop = PopulationLoop(CONFIGS, init_ppo, ppo_step, progress=False, log_every=1, checkpoint_dir=folder / "c")
    pop.run(STEPS // 2)
    shutil.copytree(folder / "c", folder / "half")
    pop.run(STEPS - STEPS // 2)
    return pop, folder / "half"


@pytest.fixture(scope="module")
def resumed(vmapped: tuple[PopulationLoop, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    "The half-way checkpoint resumed with a child MLflow run per member, run to STEPS; `(loop, telemetry, uri)`."
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    telemetry = mlflow_population(3, experiment="pop", run_name="ppo-pop", tracking_uri=uri, interval=0.1)
    loop = PopulationLoop.resume(vmapped[1], ppo_step, like=[init_ppo(c) for c in CONFIGS], config=PPOConfig,
                                 telemetry=telemetry, progress=False, log_every=1)
    assert loop.step_count == STEPS // 2 and loop.config == vmapped[0].config
    loop.run(STEPS - STEPS // 2)
    loop.close()
    return loop, telemetry, uri


def test_member_equals_the_same_run_alone_bit_for_bit(alone: dict[int, Loop]) -> None:
    pop = PopulationLoop(CONFIGS, init_ppo, ppo_step, vectorize=False, progress=False, log_every=1)
    pop.run(STEPS)
    for i, solo in alone.items():  # member 1 has its own lr: a varying hyper-parameter, still bit for bit
        member = pop.member(i)
        assert _same_bits(member.state, solo.state), f"member {i} differs from its run alone"
        assert member.history == solo.history
        assert member.config == CONFIGS[i]


def test_vmapped_member_matches_the_run_alone_to_float32_rounding(vmapped: tuple, alone: dict[int, Loop]) -> None:
    for i, solo in alone.items():
        for x, y in zip(_leaves(vmapped[0].member(i).state), _leaves(solo.state)):
            if np.issubdtype(x.dtype, np.floating):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(x, y)


def test_checkpoint_and_resume_of_the_whole_population_is_bit_exact(vmapped: tuple, resumed: tuple) -> None:
    straight, loop = vmapped[0], resumed[0]
    assert _same_bits(loop.state, straight.state)
    assert loop.history == straight.history[STEPS // 2:]
    assert loop.member(1).config.lr == 1e-3


def test_one_child_run_per_member_in_a_real_mlflow_store(resumed: tuple) -> None:
    from mlflow import MlflowClient
    loop, telemetry, uri = resumed
    client = MlflowClient(tracking_uri=uri)
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
    for i, c in enumerate(CONFIGS):
        run = by_member[i]
        assert run.info.run_name == f"ppo-pop/member-{i}" and run.info.status == "FINISHED"
        assert (float(run.data.params["lr"]), int(run.data.params["seed"])) == (c.lr, c.seed)
        history = client.get_metric_history(run.info.run_id, "policy_loss")
        expected = [(r["step"], r["policy_loss"]) for r in loop.member_history(i)]
        assert [(m.step, m.value) for m in history] == expected and len(expected) == STEPS - STEPS // 2
    means = client.get_metric_history(parent.info.run_id, "episode_return")
    assert [m.step for m in means] == list(range(STEPS // 2 + 1, STEPS + 1))


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


def test_a_nested_field_varies_per_member() -> None:
    from _configs import Cfg, Optim

    def step(state: _St, config: Cfg, batch: object) -> tuple[_St, dict]:
        return _St(state.w - config.optim.lr, state.clock), {"w": state.w.sum()}

    configs = [Cfg(seed=0, optim=Optim(lr=0.5)), Cfg(seed=0, optim=Optim(lr=0.25))]
    pop = PopulationLoop(configs, lambda c: _St(jnp.zeros(2), Clock()), step, progress=False, log_every=1)
    assert pop.config.varying == ("optim.lr",)
    pop.run(2)
    np.testing.assert_array_equal(pop.state.members.w, [[-1.0, -1.0], [-0.5, -0.5]])
    assert [r["w"] for r in pop.member_history(1)] == [0.0, -0.5]
    with pytest.raises(ValueError, match=r"differ in 'optim.betas'.*not an int or float field"):
        PopulationLoop([Cfg(), Cfg(optim=Optim(betas=(0.8, 0.9)))], lambda c: _St(jnp.zeros(2), Clock()), step)


def test_a_second_population_over_the_same_members_compiles_nothing() -> None:
    "Configs given as a new list, the default provider (a new NoBatch()), new initial States: the same program."
    first = PopulationLoop(list(CONFIGS), init_ppo, ppo_step, progress=False, log_every=1)
    first.run(1)
    again = PopulationLoop(list(CONFIGS), [init_ppo(c) for c in CONFIGS], ppo_step, progress=False, log_every=1)
    again.run(1)
    assert again._spec == first._spec and again._spec.traces == 0
    assert _same_bits(again.state, first.state)
