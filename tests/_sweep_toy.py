"""A toy builder for the sweep tests: `x` decays by `1 - lr` per step, logged as `x` (a trial is process start-up,
not training)."""

import jax
import jax.numpy as jnp
from pydantic import Field

from researchlab.design.core import Clock, Config, State
from researchlab.design.data import NoBatch
from researchlab.design.loop import Loop
from researchlab.tracking.run import Experiment


class ToyCLI(Config):
    "The options of the toy builder."
    seed: int = 0
    lr: float = Field(0.1, gt=0, lt=1)
    steps: int = Field(6, gt=0)


class ToyState(State):
    x: jax.Array
    clock: Clock


def toy_step(state: ToyState, config: ToyCLI, batch: object) -> tuple[ToyState, dict]:
    x = state.x * (1 - config.lr)
    return ToyState(x=x, clock=state.clock), {"x": x}


def toy_experiment(cli: ToyCLI) -> Experiment:
    "`x_0 = 1 + seed`, `steps` steps of `x *= 1 - lr`."
    def make_loop(state: ToyState, **kwargs: object) -> Loop:
        return Loop(cli, state, toy_step, NoBatch(), log_every=1, **kwargs)

    return Experiment(cli, init_state=lambda: ToyState(x=jnp.asarray(1.0 + cli.seed), clock=Clock()),
                      make_loop=make_loop, num_steps=cli.steps)


def final_x(lr: float, seed: int, steps: int = 6) -> float:
    "What a trial logs last."
    return (1.0 + seed) * (1 - lr) ** steps
