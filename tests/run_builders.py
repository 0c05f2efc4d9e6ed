"""Tiny experiment builders for the `rlab run` tests: a noisy quadratic descent in a few arrays, so that a run
compiles and trains in well under a second. Imported as `run_builders:quadratic` (tests/ on sys.path)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from pydantic import Field

from researchlab.design.core import Clock, Config, State
from researchlab.design.data import NoBatch
from researchlab.design.loop import Loop
from researchlab.tracking.run import Experiment


class QuadCLI(Config):
    "Options of the quadratic builder."
    steps: int = Field(8, gt=0, description="Loop steps to train for")
    lr: float = Field(0.1, gt=0, allow_inf_nan=False, description="gradient step size")
    size: int = Field(3, gt=0, description="number of parameters (the State's shape)")
    seed: int = Field(0, description="random seed of the gradient noise")
    save_every: int = Field(2, gt=0, description="steps between checkpoints")


class QuadConfig(Config):
    "The full config of a quadratic run."
    steps: int
    lr: float
    size: int
    seed: int


class QuadState(State):
    "Parameters, a PRNG key and the Clock."
    w: jax.Array
    key: jax.Array
    clock: Clock


def quad_step(state: QuadState, config: QuadConfig, batch: object = None) -> tuple[QuadState, dict[str, jax.Array]]:
    "One noisy gradient step on |w - 1|^2."
    key, sub = jax.random.split(state.key)
    grad = 2.0 * (state.w - 1.0) + 0.3 * jax.random.normal(sub, state.w.shape)
    w = state.w - config.lr * grad
    new = eqx.tree_at(lambda s: (s.w, s.key, s.clock), state, (w, key, state.clock.advance(steps=1)))
    return new, {"loss": jnp.sum((w - 1.0) ** 2), "w0": w[0]}


def quadratic(cli: QuadCLI) -> Experiment:
    "A noisy quadratic descent: seconds to run, for tests."
    config = QuadConfig(steps=cli.steps, lr=cli.lr, size=cli.size, seed=cli.seed)

    def init() -> QuadState:
        return QuadState(w=jnp.zeros(config.size), key=jax.random.key(config.seed), clock=Clock())

    def make_loop(state: QuadState, **kw: object) -> Loop:
        return Loop(config, state, quad_step, NoBatch(), log_every=1, save_every=cli.save_every, **kw)

    def finish(loop: Loop, run_dir: object, client: object, run_id: str) -> dict[str, object]:
        loss = float(loop.history[-1]["loss"])
        return {"final_loss": loss, "summary": [f"final loss:   {loss:.4f}"]}

    return Experiment(config, init_state=init, make_loop=make_loop, num_steps=config.steps, finish=finish,
                      experiment="quad", description="quadratic")


def not_an_experiment(cli: QuadCLI) -> int:
    "Annotated like a builder, but returns no Experiment."
    return 3


NOT_CALLABLE = 5
