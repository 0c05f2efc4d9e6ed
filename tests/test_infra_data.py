"""ArrayDataProvider: epochs cover the data, order is a pure function of (seed, clock), jittable under scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from researchlab.design.core import Clock, State
from researchlab.design.data import ArrayDataProvider, DataProvider


class Run(State):
    clock: Clock
    total: jax.Array


def data(n: int = 23) -> dict:
    return {"x": jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.ones((1, 2)), "y": {"label": jnp.arange(n)}}


def test_every_epoch_is_a_permutation_and_epochs_differ() -> None:
    dp = ArrayDataProvider(data(23), batch_size=5, seed=3)
    assert dp.steps_per_epoch == 4 and dp.jittable and isinstance(dp, DataProvider)
    epochs = []
    for e in range(3):
        labels = np.concatenate([np.asarray(dp.batch_at(e * 4 + i)["y"]["label"]) for i in range(4)])
        assert len(set(labels.tolist())) == 20  # 20 distinct examples, 3 dropped (incomplete last batch)
        epochs.append(labels)
        batch = dp.batch_at(e * 4)
        np.testing.assert_array_equal(np.asarray(batch["x"][:, 0]), np.asarray(batch["y"]["label"], np.float32))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(
        np.asarray(ArrayDataProvider(data(23), 5, seed=4).batch_at(0)["y"]["label"]), epochs[0][:5])


def test_resumed_run_sees_the_same_batches_as_an_uninterrupted_one() -> None:
    def run(provider: ArrayDataProvider, state: Run, steps: int) -> tuple[Run, list]:
        seen = []
        for _ in range(steps):
            batch = provider.get_batch(state)
            seen.append(np.asarray(batch["y"]["label"]))
            state = Run(state.clock.tick(), state.total + batch["x"].sum())
        return state, seen

    start = Run(Clock(), jnp.float32(0))
    full_state, full = run(ArrayDataProvider(data(), 4, seed=9), start, 12)
    mid, first = run(ArrayDataProvider(data(), 4, seed=9), start, 7)
    # a fresh provider (as after a restart) continues from the checkpointed clock
    end, rest = run(ArrayDataProvider(data(), 4, seed=9), Run(Clock().advance(7), mid.total), 5)
    for a, b in zip(full, first + rest):
        np.testing.assert_array_equal(a, b)
    assert float(end.total) == float(full_state.total)


def test_get_batch_is_traceable_inside_lax_scan() -> None:
    dp = ArrayDataProvider(data(), 4, seed=1)

    def step(state: Run, _: None) -> tuple[Run, jax.Array]:
        batch = dp.get_batch(state)
        return Run(state.clock.tick(), state.total + batch["x"].sum()), batch["y"]["label"]

    final, labels = jax.jit(lambda s: jax.lax.scan(step, s, None, length=10))(Run(Clock(), jnp.float32(0)))
    for t in range(10):
        np.testing.assert_array_equal(np.asarray(labels[t]), np.asarray(dp.batch_at(t)["y"]["label"]))
    assert int(final.clock.step) == 10


def test_iterator_and_unshuffled_order() -> None:
    dp = ArrayDataProvider({"x": jnp.arange(6)}, 2, shuffle=False)
    got = [np.asarray(next(dp)["x"]).tolist() for _ in range(4)]
    assert got == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert iter(dp) is dp
    # a Clock itself is accepted as the state
    assert np.asarray(dp.get_batch(Clock().advance(2))["x"]).tolist() == [4, 5]


@pytest.mark.parametrize("kwargs, culprit", [
    ({"data": {"x": jnp.zeros(4), "y": jnp.zeros(3)}, "batch_size": 2}, "['y']"),
    ({"data": {"x": jnp.zeros(())}, "batch_size": 1}, "['x']"),
    ({"data": {}, "batch_size": 1}, "no array leaves"),
    ({"data": {"x": jnp.zeros(4)}, "batch_size": 0}, "batch_size=0"),
    ({"data": {"x": jnp.zeros(4)}, "batch_size": 5}, "batch_size=5"),
])
def test_bad_construction_names_the_culprit(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError) as e:
        ArrayDataProvider(**kwargs)
    assert culprit in str(e.value)


@pytest.mark.parametrize("batch_size, culprit", [
    (2.5, "got float batch_size=2.5"), ("4", "got str batch_size='4'"), (True, "got bool batch_size=True"),
    (np.float32(2), "got float32 batch_size=np.float32(2.0)"),
])
def test_batch_size_that_is_not_an_int_names_the_value(batch_size: object, culprit: str) -> None:
    with pytest.raises(TypeError, match="ArrayDataProvider: batch_size must be an int") as e:
        ArrayDataProvider({"x": jnp.zeros(4)}, batch_size)
    assert culprit in str(e.value)
    assert ArrayDataProvider({"x": jnp.zeros(4)}, np.int64(2)).batch_size == 2


def test_state_without_a_clock_is_a_clear_error() -> None:
    class NoClock(State):
        w: jax.Array

    with pytest.raises(AttributeError, match="NoClock has no Clock in field 'clock'"):
        ArrayDataProvider({"x": jnp.zeros(4)}, 2).get_batch(NoClock(jnp.zeros(1)))


def test_provider_is_a_pytree_of_its_data() -> None:
    import equinox as eqx

    dp = ArrayDataProvider(data(), 4, seed=2)
    leaves = jax.tree_util.tree_leaves(dp)
    assert len(leaves) == 2 and all(isinstance(x, jax.Array) for x in leaves)
    dyn, static = eqx.partition(dp, eqx.is_array)  # what a Loop does to pass the data into jit
    state = Run(Clock().advance(5), jnp.float32(0))

    @jax.jit
    def batch(dyn: object, state: Run) -> dict:
        return eqx.combine(dyn, static).get_batch(state)

    np.testing.assert_array_equal(np.asarray(batch(dyn, state)["y"]["label"]), np.asarray(dp.batch_at(5)["y"]["label"]))
    # the data are arguments, not constants baked into the program
    closed = jax.make_jaxpr(lambda d, s: eqx.combine(d, static).get_batch(s))(dyn, state)
    assert not [c for c in closed.consts if np.size(c) >= 23]
    baked = jax.make_jaxpr(lambda s: dp.get_batch(s))(state)  # closing over the provider bakes the data in
    assert [c for c in baked.consts if np.size(c) >= 23]
    doubled = jax.tree_util.tree_map(lambda x: x * 2, dp)
    assert isinstance(doubled, ArrayDataProvider) and doubled.batch_size == 4
    np.testing.assert_array_equal(np.asarray(doubled.batch_at(5)["y"]["label"]),
                                  2 * np.asarray(dp.batch_at(5)["y"]["label"]))


# ---- the shuffle: a keyed bijection evaluated per batch (O(batch_size) per step) -----------------------------

def _epoch_orders(dp: ArrayDataProvider, epochs: int) -> np.ndarray:
    "Labels served in each of `epochs` epochs, shape (epochs, steps_per_epoch * batch_size)."
    steps = jnp.arange(epochs * dp.steps_per_epoch)
    labels = jax.jit(jax.vmap(lambda t: dp.batch_at(t)["y"]["label"]))(steps)
    return np.asarray(labels).reshape(epochs, -1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 13, 16, 17, 64, 97, 1000, 1009, 65537])
def test_every_epoch_visits_every_example_once(n: int) -> None:
    "batch_size = N: one step per epoch, whose batch is the whole permutation (N = 1, primes, powers of 2 and 2^k + 1)."
    for e, order in enumerate(_epoch_orders(ArrayDataProvider(data(n), n, seed=n), 4)):
        np.testing.assert_array_equal(np.sort(order), np.arange(n), err_msg=f"N={n}, epoch {e}")


@pytest.mark.parametrize("n, batch_size", [(13, 4), (97, 10), (1009, 32), (5, 1)])
def test_epoch_batches_are_disjoint_slices_of_one_permutation(n: int, batch_size: int) -> None:
    from researchlab.design.data import keyed_permutation

    dp = ArrayDataProvider(data(n), batch_size, seed=5)
    orders = _epoch_orders(dp, 3)
    for e, order in enumerate(orders):
        assert len(set(order.tolist())) == dp.steps_per_epoch * batch_size, f"epoch {e} repeats an example"
        perm = keyed_permutation(jnp.arange(n), n, jax.random.fold_in(jax.random.key(5), e))
        np.testing.assert_array_equal(order, np.asarray(perm)[: len(order)])  # batches are consecutive slices
        np.testing.assert_array_equal(np.sort(np.asarray(perm)), np.arange(n))


@pytest.mark.parametrize("n", [5, 13, 200, 1009])
def test_epochs_and_seeds_give_different_orders(n: int) -> None:
    orders = _epoch_orders(ArrayDataProvider(data(n), n, seed=0), 6)
    assert len({tuple(o) for o in orders.tolist()}) >= (4 if n == 5 else 6), orders
    other = _epoch_orders(ArrayDataProvider(data(n), n, seed=1), 1)[0]
    assert not np.array_equal(orders[0], other)
    assert not np.array_equal(orders[0], np.arange(n))  # shuffled, not the identity


def test_order_is_deterministic_and_jit_matches_eager() -> None:
    n = 1009
    a, b = ArrayDataProvider(data(n), 16, seed=42), ArrayDataProvider(data(n), 16, seed=42)
    jit_closed, jit_arg = jax.jit(a.batch_at), jax.jit(lambda p, s: p.batch_at(s))
    for t in (0, 1, 62, 63, 64, 1000):  # 63 steps per epoch: both sides of an epoch boundary
        eager = np.asarray(a.batch_at(t)["y"]["label"])
        np.testing.assert_array_equal(eager, np.asarray(b.batch_at(t)["y"]["label"]))
        np.testing.assert_array_equal(eager, np.asarray(jit_closed(t)["y"]["label"]))
        np.testing.assert_array_equal(eager, np.asarray(jit_arg(b, jnp.int32(t))["y"]["label"]))


def test_shuffle_of_a_large_dataset_is_a_permutation() -> None:
    from researchlab.design.data import keyed_permutation

    n = 200_000
    perm = np.asarray(jax.jit(lambda k: keyed_permutation(jnp.arange(n), n, k))(jax.random.key(7)))
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    assert abs(np.corrcoef(np.arange(n), perm)[0, 1]) < 0.01  # no trace of the input order


def test_a_step_computes_nothing_of_size_n() -> None:
    "The per-step work is O(batch_size): no intermediate array in the step's program has N elements."
    n, batch_size = 10_000, 8
    dp = ArrayDataProvider({"y": {"label": jnp.arange(n)}}, batch_size, seed=0)
    jaxpr = jax.make_jaxpr(lambda p, t: p.batch_at(t))(dp, jnp.int32(3))

    def sizes(jpr: object) -> list[int]:
        "Element counts of every value computed in `jpr` (a Jaxpr or ClosedJaxpr), sub-programs included."
        jpr = getattr(jpr, "jaxpr", jpr)
        out = []
        for eqn in jpr.eqns:
            out += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
            for p in eqn.params.values():
                for sub in (p if isinstance(p, tuple | list) else (p,)):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        out += sizes(sub)
        return out

    assert max(sizes(jaxpr.jaxpr)) < n
    # the old implementation (a full permutation per step) fails this check
    full = jax.make_jaxpr(lambda t: jax.random.permutation(jax.random.key(0), n)[t])(jnp.int32(3))
    assert max(sizes(full.jaxpr)) >= n


def test_keyed_permutation_places_each_element_uniformly() -> None:
    "Over many keys, element 0 of a permutation of 8 lands on every position about equally often (PPO's use)."
    from researchlab.design.data import keyed_permutation

    n, draws = 8, 8000
    perms = np.asarray(jax.jit(jax.vmap(lambda k: keyed_permutation(jnp.arange(n), n, k)))(
        jax.random.split(jax.random.key(11), draws)))
    np.testing.assert_array_equal(np.sort(perms, axis=1), np.broadcast_to(np.arange(n), perms.shape))
    counts = np.bincount(np.argmax(perms == 0, axis=1), minlength=n)
    expected = draws / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (counts, chi2)  # the 0.1% tail of chi-square with 7 degrees of freedom
    # 8000 uniform draws among all 8! = 40320 orders would give about 7260 distinct ones; this small Feistel domain
    # (3 bits) is not uniform over the orders and gives about 6500, while a network that reached only a few orders
    # would give far fewer. Per position (above) it is uniform.
    assert len({tuple(p) for p in perms.tolist()}) > 0.75 * draws
