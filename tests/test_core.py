"""Core: Config serialisation round-trips, Selectors under jit/vmap/grad, and bad inputs."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from researchlab import (
    Clock,
    Config,
    FieldSelector,
    Selector,
    SelectorPathError,
    State,
    flatten_config,
    flatten_pytree,
    next_key,
    take_key,
    unflatten_config,
    unflatten_pytree,
)
from researchlab.design.core import ConfigFileError


class Inner(Config):
    lr: float = 1e-3
    name: str = "adam"
    sizes: tuple[int, ...] = (64, 64)
    flag: bool = False


class Outer(Config):
    seed: int = 0
    inner: Inner = Inner()
    gamma: float = 0.99
    tag: str | None = None


class Deep(Config):
    outer: Outer = Outer()
    scale: float = 1.0


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
inners = st.builds(Inner, lr=finite, name=text, sizes=st.tuples(*[st.integers(-(2**31), 2**31)] * 2), flag=st.booleans())
outers = st.builds(Outer, seed=st.integers(-(2**62), 2**62), inner=inners, gamma=finite, tag=st.none() | text)
deeps = st.builds(Deep, outer=outers, scale=finite)


@settings(max_examples=60, deadline=None)
@given(deeps)
def test_yaml_json_roundtrip_strings(cfg: Deep) -> None:
    assert Deep.from_yaml(cfg.to_yaml()) == cfg
    assert Deep.from_json(cfg.to_json()) == cfg


@settings(max_examples=20, deadline=None)
@given(deeps)
def test_yaml_json_roundtrip_files(tmp_path_factory: pytest.TempPathFactory, cfg: Deep) -> None:
    d = tmp_path_factory.mktemp("cfg")
    cfg.to_yaml(d / "c.yaml")
    cfg.to_json(d / "c.json")
    assert Deep.from_yaml(d / "c.yaml") == cfg
    assert Deep.from_yaml(str(d / "c.yaml")) == cfg
    assert Deep.from_json(str(d / "c.json")) == cfg


@settings(max_examples=60, deadline=None)
@given(deeps, st.sampled_from([".", "/", "__"]), st.sampled_from(["", "cfg"]))
def test_flatten_unflatten_config(cfg: Deep, sep: str, prefix: str) -> None:
    flat = flatten_config(cfg, separator=sep)
    assert all(not isinstance(v, dict) for v in flat.values())
    assert unflatten_config(flat, Deep, separator=sep) == cfg
    if prefix:
        assert all(k.startswith(prefix + sep) for k in flatten_config(cfg, prefix=prefix, separator=sep))


def test_nonfinite_floats_roundtrip() -> None:
    cfg = Deep(scale=float("inf"), outer=Outer(gamma=float("-inf")))
    assert Deep.from_json(cfg.to_json()) == cfg
    assert Deep.from_yaml(cfg.to_yaml()) == cfg


# PyTrees: nested dicts/lists/tuples of arrays, flatten -> unflatten is the identity
leaf = st.integers(1, 4).map(lambda n: jnp.arange(n, dtype=jnp.float32))
trees = st.recursive(
    leaf,
    lambda ch: st.lists(ch, min_size=1, max_size=3)
    | st.dictionaries(st.text("abcxyz", min_size=1, max_size=3), ch, min_size=1, max_size=3)
    | st.tuples(ch, ch),
    max_leaves=8,
)


@settings(max_examples=80, deadline=None)
@given(trees)
def test_flatten_unflatten_pytree(tree: object) -> None:
    flat = flatten_pytree(tree)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, tree)
    rebuilt = unflatten_pytree(flat, zeros)
    assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(rebuilt), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_array_equal(a, b)
    # leaves missing from the dict are kept from the structure
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(unflatten_pytree({}, tree)), jax.tree_util.tree_leaves(tree))
    )


# ---- Selectors under transformations -----------------------------------------------------------
class Params(State):
    w: jax.Array
    b: jax.Array


class TrainState(State):
    params: Params
    batch: dict
    clock: Clock
    rng: jax.Array


class Hyper(Config):
    l2: float = 0.1


def _loss(w: jax.Array, b: jax.Array, x: jax.Array, y: jax.Array, l2: float) -> jax.Array:
    return jnp.mean((x @ w + b - y) ** 2) + l2 * jnp.sum(w**2)


loss = FieldSelector(w="state.params.w", b="state.params.b", x="state.batch.x", y="state.batch.y", l2="config.l2")(_loss)


def _state(seed: int = 0) -> TrainState:
    k = jax.random.PRNGKey(seed)
    x = jax.random.normal(k, (8, 3))
    return TrainState(
        params=Params(w=jnp.ones(3), b=jnp.zeros(())),
        batch={"x": x, "y": x.sum(-1)},
        clock=Clock(),
        rng=jax.random.key(seed),
    )


def test_selected_kernel_jit_matches_raw() -> None:
    s, c = _state(), Hyper()
    expected = _loss(s.params.w, s.params.b, s.batch["x"], s.batch["y"], c.l2)
    np.testing.assert_allclose(jax.jit(loss)(s, c), expected, rtol=1e-6)
    np.testing.assert_allclose(eqx.filter_jit(loss)(s, c), expected, rtol=1e-6)
    assert loss.raw is _loss


def test_selected_kernel_grad() -> None:
    s, c = _state(), Hyper()
    # The whole State holds int clocks and keys: differentiate its float leaves with eqx.filter_grad.
    g = eqx.filter_grad(loss)(s, c)
    assert isinstance(g, TrainState) and g.clock.step is None
    gw = jax.grad(_loss)(s.params.w, s.params.b, s.batch["x"], s.batch["y"], c.l2)
    np.testing.assert_allclose(g.params.w, gw, rtol=1e-5)


def test_selected_kernel_vmap() -> None:
    states = jax.vmap(lambda k: _state_from_key(k))(jax.random.split(jax.random.PRNGKey(1), 5))
    out = jax.vmap(loss, in_axes=(0, None))(states, Hyper())
    assert out.shape == (5,)
    for i in range(5):
        s_i = jax.tree_util.tree_map(lambda a: a[i], states)
        np.testing.assert_allclose(out[i], loss(s_i, Hyper()), rtol=1e-5)


def _state_from_key(k: jax.Array) -> TrainState:
    x = jax.random.normal(k, (8, 3))
    return TrainState(Params(jnp.ones(3), jnp.zeros(())), {"x": x, "y": x.sum(-1)}, Clock(), k)


def test_config_change_recompiles_under_jit() -> None:
    traces = []

    @jax.jit
    def f(x: jax.Array, c: Hyper) -> jax.Array:
        traces.append(1)
        return x * c.l2

    assert float(f(jnp.float32(1.0), Hyper(l2=2.0))) == 2.0
    assert float(f(jnp.float32(1.0), Hyper(l2=2.0))) == 2.0
    assert float(f(jnp.float32(1.0), Hyper(l2=3.0))) == 3.0
    assert len(traces) == 2


def test_take_key_inside_jit_both_key_kinds() -> None:
    for key in (jax.random.PRNGKey(3), jax.random.key(3)):
        s = dataclasses.replace(_state(), rng=key)
        s2, sub = jax.jit(take_key)(s)
        _, sub_ref = next_key(key)
        np.testing.assert_array_equal(jax.random.key_data(sub), jax.random.key_data(sub_ref))
        assert s2.rng.dtype == key.dtype


# ---- bad inputs: the error type, and a message that names the culprit ---------------------------
def test_unknown_config_key() -> None:
    with pytest.raises(pydantic.ValidationError, match="lrr"):
        Inner(lrr=0.1)


def test_wrong_type() -> None:
    with pytest.raises(pydantic.ValidationError, match="seed"):
        Outer(seed="zero")


def test_nested_wrong_type_names_path() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"inner\.lr"):
        Outer.model_validate({"inner": {"lr": "fast"}})


def test_mutation_rejected() -> None:
    cfg = Outer()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]
    assert cfg.seed == 0


def test_bad_path_prefix() -> None:
    with pytest.raises(ValueError, match="params.w"):
        FieldSelector(w="params.w")


def test_missing_attribute() -> None:
    k = FieldSelector(w="state.params.weight")(lambda w: w)
    with pytest.raises(SelectorPathError, match=r"state\.params\.weight.*'weight'"):
        k(_state(), Hyper())


def test_index_out_of_range() -> None:
    class S(State):
        xs: list

    k = FieldSelector(x="state.xs.2")(lambda x: x)
    with pytest.raises(SelectorPathError, match=r"index 2 out of range.*length 1"):
        k(S(xs=[jnp.ones(1)]), Hyper())


def test_missing_dict_key() -> None:
    k = FieldSelector(x="state.batch.obs")(lambda x: x)
    with pytest.raises(SelectorPathError, match=r"no key 'obs'"):
        k(_state(), Hyper())


def test_missing_config_field() -> None:
    k = FieldSelector(x="config.l3")(lambda x: x)
    with pytest.raises(SelectorPathError, match="config.l3"):
        k(_state(), Hyper())


def test_yaml_not_mapping(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        Outer.from_yaml(p)


def test_yaml_unknown_key_in_file(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("seed: 1\ninner:\n  lr: 0.1\n  momentum: 0.9\n")
    with pytest.raises(ConfigFileError, match=r"c\.yaml, line 4: inner\.momentum: Extra inputs are not permitted"):
        Outer.from_yaml(p)


def test_missing_yaml_file() -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Outer.from_yaml("nope.yaml")


def test_unflatten_key_conflict() -> None:
    with pytest.raises(ValueError, match="'inner'"):
        unflatten_config({"inner": 1, "inner.lr": 0.1}, Outer)


def test_replace_unknown_field() -> None:
    with pytest.raises(ValueError, match="'lrr'"):
        Outer().replace(**{"inner.lrr": 0.1})
    with pytest.raises(ValueError, match="'sed'"):
        Outer().replace(sed=1)


def test_replace_validates_and_keeps_original() -> None:
    cfg = Outer()
    new = cfg.replace(seed=4, **{"inner.lr": 0.5})
    assert (new.seed, new.inner.lr, cfg.seed, cfg.inner.lr) == (4, 0.5, 0, 1e-3)
    with pytest.raises(pydantic.ValidationError, match="seed"):
        cfg.replace(seed="x")
    with pytest.raises(ValueError, match="not a nested config"):
        cfg.replace(**{"seed.x": 1})


def test_unhashable_field_named() -> None:
    class L(Config):
        hidden: list[int] = [1, 2]

    with pytest.raises(TypeError, match=r"L\.hidden.*tuple"):
        hash(L())


def test_unflatten_pytree_unknown_key() -> None:
    with pytest.raises(ValueError, match="params.z"):
        unflatten_pytree({"params.z": 1}, _state())


def test_selector_requires_callable() -> None:
    with pytest.raises(TypeError, match="callable"):
        Selector(3)  # type: ignore[arg-type]
