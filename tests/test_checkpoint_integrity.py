"""Checkpoint integrity: a corruption matrix x {EquinoxPersister, OrbaxPersister}, fallback to the newest checkpoint
that verifies (also through `Loop.resume`), a full disk (tmpfs-limited mount, and a fault-injecting writer), and bad
inputs (negative steps, another State class with the same fields, damaged `.eqx` headers, older formats)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _configs import Cfg

from researchlab.design.core import Clock, State
from researchlab.design.data import NoBatch
from researchlab.design.eqx_persist import EquinoxPersister
from researchlab.design.loop import Loop
from researchlab.design.orbax_persist import OrbaxPersister
from researchlab.design.persist import (
    CheckpointError,
    CheckpointManager,
    CheckpointVersionError,
    DiskFullError,
)

MAGIC, END = b"RLABCKPT2\n", b"\nRLABEND\n"


class Net(State):
    clock: Clock
    w: jax.Array
    b: jax.Array
    rng: jax.Array


class Twin(State):  # the same fields as Net, another class
    clock: Clock
    w: jax.Array
    b: jax.Array
    rng: jax.Array


def make_net(step: int = 0, n: int = 256) -> Net:
    k = jax.random.key(step)
    return Net(Clock().advance(step), jax.random.normal(k, (n, 4)), jnp.full((4,), float(step)), k)


LIKE = make_net()


def _folder(tmp_path: Path, persister: type) -> CheckpointManager:
    "A manager holding the checkpoints of steps 10 and 20 (20 is the one the corruptions damage)."
    mgr = CheckpointManager(tmp_path / "ckpts", persister(), keep=None)
    for step in (10, 20):
        mgr.save(make_net(step), Cfg(seed=step), step)
    return mgr


# ---- the .eqx file: where things are -----------------------------------------------------------
def _eqx_layout(path: Path) -> tuple[int, dict, int]:
    "(offset of the header JSON, the header, offset of the first leaf record) of a checkpoint file."
    raw = path.read_bytes()
    n = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8
    return start, json.loads(raw[start:start + n]), start + n + 4


def _record_offset(path: Path, leaf: str) -> tuple[int, int]:
    "(offset, length) of a leaf's `.npy` record in a checkpoint file."
    _, header, off = _eqx_layout(path)
    for rec in header["leaves"]:
        if rec["path"] == leaf:
            return off, rec["nbytes"]
        off += rec["nbytes"]
    raise KeyError(leaf)


def _rewrite_header(path: Path, edit: Callable[[dict], object], raw_text: bytes | None = None) -> None:
    "Replace the JSON header by an edited one with a *valid* crc32 (a consistent but wrong file)."
    raw = path.read_bytes()
    start, header, data = _eqx_layout(path)
    text = raw_text if raw_text is not None else json.dumps(edit(header) or header).encode()
    path.write_bytes(MAGIC + len(text).to_bytes(8, "little") + text + zlib.crc32(text).to_bytes(4, "big") + raw[data:])


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def _zero16(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 16] = bytes(16)
    path.write_bytes(bytes(raw))


def _weights(path: Path) -> int:
    off, n = _record_offset(path, ".w")
    return off + n // 2


def _eqx_step_20_to_25(path: Path) -> None:
    raw = path.read_bytes()
    start, _, data = _eqx_layout(path)
    text = raw[start:data - 4]
    assert text.count(b'"step": 20') == 1
    path.write_bytes(raw[:start] + text.replace(b'"step": 20', b'"step": 25') + raw[data - 4:])


def _eqx_header_length(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:len(MAGIC)] + (2**64 - 1).to_bytes(8, "little") + raw[len(MAGIC) + 8:])


def _eqx_cut_middle(path: Path) -> None:
    raw = path.read_bytes()
    off = _weights(path)
    path.write_bytes(raw[:off] + raw[off + 100:])


# (name, damage, what the error says, the leaf it names or None)
EQX_DAMAGE = [
    ("weights byte flipped", lambda p: _flip(p, _weights(p)), "checksum mismatch", ".w"),
    ("16 bytes zeroed", lambda p: _zero16(p, _weights(p)), "checksum mismatch", ".w"),
    ("npy header byte flipped", lambda p: _flip(p, _record_offset(p, ".b")[0] + 20), "checksum mismatch", ".b"),
    ("json header byte flipped", lambda p: _flip(p, _eqx_layout(p)[0] + 5), "bad header: checksum mismatch", None),
    ("header length 2^64-1", _eqx_header_length, "its length field says 18446744073709551615 bytes", None),
    ("header step 20 -> 25", _eqx_step_20_to_25, "bad header: checksum mismatch", None),
    ("100 bytes cut from the middle", _eqx_cut_middle, "truncated or padded", None),
    ("no 'step' in the header (valid crc)", lambda p: _rewrite_header(p, lambda h: h.pop("step") and h),
     "bad header: no 'step'", None),
    ("header not UTF-8 (valid crc)", lambda p: _rewrite_header(p, None, raw_text=b"\xff\xfe{}"),
     "bad header: not JSON", None),
    ("leaf records missing (valid crc)", lambda p: _rewrite_header(p, lambda h: h.update(leaves=h["leaves"][:1])),
     "bad header: 1 leaf records for", None),
]


# ---- the orbax folder --------------------------------------------------------------------------
def _orbax_data_file(path: Path) -> Path:
    return max((p for p in (path / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _orbax_meta_file(path: Path) -> Path:
    return next(p for p in (path / "meta").rglob("*") if p.is_file() and b'"step": 20' in p.read_bytes())


def _orbax_flip_data(path: Path) -> None:
    f = _orbax_data_file(path)
    _flip(f, f.stat().st_size // 2)


def _orbax_truncate_data(path: Path) -> None:
    f = _orbax_data_file(path)
    f.write_bytes(f.read_bytes()[:-10])


def _orbax_step(path: Path) -> None:
    f = _orbax_meta_file(path)
    f.write_bytes(f.read_bytes().replace(b'"step": 20', b'"step": 25'))


ORBAX_DAMAGE = [
    ("data file byte flipped", _orbax_flip_data, "checksum mismatch", None),
    ("state/ folder deleted", lambda p: shutil.rmtree(p / "state"), "file state/", None),
    ("data file truncated", _orbax_truncate_data, "the manifest says", None),
    ("header step 20 -> 25", _orbax_step, "checksum mismatch", None),
    ("manifest byte flipped", lambda p: _flip(p / "rlab_manifest.json", 30), "bad manifest", None),
]

MATRIX = ([pytest.param(EquinoxPersister, *d[1:], id=f"eqx-{d[0]}") for d in EQX_DAMAGE]
          + [pytest.param(OrbaxPersister, *d[1:], id=f"orbax-{d[0]}") for d in ORBAX_DAMAGE])


@pytest.mark.parametrize("persister, damage, reason, leaf", MATRIX)
def test_damaged_checkpoint_is_refused_by_load_and_skipped_by_restore(
        tmp_path: Path, persister: type, damage: Callable, reason: str, leaf: str | None) -> None:
    mgr = _folder(tmp_path, persister)
    victim = mgr.path_for(20)
    damage(victim)
    # an explicit load raises, naming the file, the reason and (for a leaf's bytes) the leaf
    with pytest.raises(CheckpointError) as e:
        mgr.persister.load(victim, LIKE, Cfg)
    assert str(victim) in str(e.value) and reason in str(e.value), str(e.value)
    if leaf is not None:
        assert e.value.leaf == leaf and f"(leaf {leaf})" in str(e.value)
    # restore() warns, naming the checkpoint and the reason, sets it aside and falls back to step 10
    with pytest.warns(UserWarning, match="skipping") as caught:
        state, cfg, step = mgr.restore(LIKE, Cfg)
    assert (step, cfg.seed, int(state.clock.step)) == (10, 10, 10)
    np.testing.assert_array_equal(np.asarray(state.w), np.asarray(make_net(10).w))
    msg = str(caught[0].message)
    assert victim.name in msg and reason in msg and "falling back" in msg, msg
    assert [s for s, _ in mgr.checkpoints()] == [10]
    assert victim.with_name(victim.name + ".damaged").exists()


@pytest.mark.parametrize("persister", [EquinoxPersister, OrbaxPersister])
def test_a_consistent_file_whose_header_says_another_step_than_its_name_is_skipped(
        tmp_path: Path, persister: type) -> None:
    mgr = _folder(tmp_path, persister)
    # the checkpoint of step 25 copied onto the name of step 20: every checksum holds
    src = mgr.persister.save(make_net(25), Cfg(seed=25), 25, tmp_path / f"other{mgr.persister.suffix}")
    _remove_any(mgr.path_for(20))
    os.replace(src, mgr.path_for(20))
    with pytest.warns(UserWarning, match="its header says step 25 but its name says step 20"):
        assert mgr.restore(LIKE, Cfg)[2] == 10


def _remove_any(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.mark.parametrize("persister", [EquinoxPersister, OrbaxPersister])
def test_when_no_checkpoint_verifies_restore_says_so_and_lists_each(tmp_path: Path, persister: type) -> None:
    mgr = _folder(tmp_path, persister)
    for step in (10, 20):
        (_flip(mgr.path_for(step), _weights(mgr.path_for(step))) if persister is EquinoxPersister
         else _orbax_flip_data(mgr.path_for(step)))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="none of its 2 checkpoints verifies") as e:
        mgr.restore(LIKE, Cfg)
    assert "ckpt_0000000010" in str(e.value) and "ckpt_0000000020" in str(e.value)


def test_an_explicit_path_is_not_replaced_by_a_fallback(tmp_path: Path) -> None:
    mgr = _folder(tmp_path, EquinoxPersister)
    _flip(mgr.path_for(20), _weights(mgr.path_for(20)))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        mgr.restore(LIKE, Cfg, path=mgr.path_for(20))
    assert mgr.path_for(20).exists()  # an explicit load moves nothing


def test_loop_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path: Path) -> None:
    def step_fn(s: Net, cfg: Cfg, batch: None) -> tuple[Net, dict]:
        return Net(s.clock.advance(), s.w + 1.0, s.b, s.rng), {"w": s.w.mean()}

    loop = Loop(Cfg(), make_net(0, n=8), step_fn, NoBatch(), checkpoint_dir=tmp_path, save_every=5,
                progress=False, log_every=None)
    loop.run(10)
    assert [s for s, _ in CheckpointManager(tmp_path).checkpoints()] == [5, 10]
    latest = CheckpointManager(tmp_path).path_for(10)
    _flip(latest, _weights(latest))
    with pytest.warns(UserWarning, match=f"skipping {latest}.*checksum mismatch"):
        resumed = Loop.resume(tmp_path, step_fn, NoBatch(), like=make_net(0, n=8), config=Cfg, progress=False,
                              log_every=None)
    assert resumed.step_count == 5
    resumed.run(5)  # continues, and writes a good checkpoint of step 10 again
    assert [s for s, _ in CheckpointManager(tmp_path).checkpoints()] == [5, 10]
    state, _, step = CheckpointManager(tmp_path).restore(make_net(0, n=8), Cfg)
    assert step == 10 and float(state.w[0, 0]) == pytest.approx(float(make_net(0, n=8).w[0, 0]) + 10)


# ---- older formats -----------------------------------------------------------------------------
def _write_v1(path: Path, net: Net, step: int) -> None:
    "A checkpoint in format 1 (before checksums), as the previous version wrote it."
    from researchlab.design.utils import fingerprint
    header = json.dumps({"step": step, "config": None, "fingerprint": fingerprint(net)}).encode()
    with open(path, "wb") as f:
        f.write(b"RLABCKPT1\n" + len(header).to_bytes(8, "little") + header)
        for leaf in jax.tree_util.tree_leaves(net):
            arr = jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
            np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
        f.write(END)


def test_checkpoints_of_the_older_format_refuse_with_a_clear_message(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=None)
    mgr.save(make_net(10), Cfg(), 10)
    _write_v1(mgr.path_for(20), make_net(20), 20)
    with pytest.raises(CheckpointVersionError, match="written by an older version of researchlab") as e:
        EquinoxPersister().load(mgr.path_for(20), LIKE, Cfg)
    assert str(mgr.path_for(20)) in str(e.value)
    with pytest.warns(UserWarning, match="ckpt_0000000020.eqx: written by an older version"):
        assert mgr.restore(LIKE, Cfg)[2] == 10
    assert mgr.path_for(20).exists()  # not damaged: left where it is
    # an orbax folder without a manifest (written before manifests existed)
    omgr = CheckpointManager(tmp_path / "orbax", OrbaxPersister(), keep=None)
    omgr.save(make_net(10), Cfg(), 10)
    (omgr.path_for(10) / "rlab_manifest.json").unlink()
    with pytest.raises(CheckpointVersionError, match="no checksum manifest"):
        omgr.persister.load(omgr.path_for(10), LIKE, Cfg)


# ---- bad inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("persister", [EquinoxPersister, OrbaxPersister])
def test_bad_steps_are_refused_before_anything_is_written(tmp_path: Path, persister: type) -> None:
    mgr = CheckpointManager(tmp_path / "c", persister())
    with pytest.raises(ValueError, match=r"CheckpointManager.save: step must be an int >= 0 .*got -1"):
        mgr.save(make_net(), Cfg(), -1)
    for bad in (True, "3", 2.5, None):
        with pytest.raises(TypeError, match=f"step must be an int >= 0.*got {bad!r}"):
            mgr.save(make_net(), Cfg(), bad)
    with pytest.raises(ValueError, match="got -3"):
        persister().save(make_net(), Cfg(), -3, tmp_path / f"x{persister.suffix}")
    assert list((tmp_path / "c").iterdir()) == [] and not (tmp_path / f"x{persister.suffix}").exists()
    assert mgr.save(make_net(3), Cfg(), np.int64(3)) == mgr.path_for(3)  # numpy ints are ints


@pytest.mark.parametrize("persister", [EquinoxPersister, OrbaxPersister])
def test_loading_into_another_state_class_with_the_same_fields_names_both(tmp_path: Path, persister: type) -> None:
    p = persister()
    path = p.save(make_net(4), Cfg(), 4, tmp_path / f"c{p.suffix}")
    twin = Twin(LIKE.clock, LIKE.w, LIKE.b, LIKE.rng)
    with pytest.raises(ValueError, match="holds a State of class .*Net, but state_structure is a .*Twin") as e:
        p.load(path, twin, Cfg)
    assert str(path) in str(e.value)


# ---- a full disk -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    "A 2 MiB tmpfs mounted for the test (skipped with the reason where mounting is not allowed)."
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a size-limited tmpfs to fill a disk: {e}")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs to fill a disk (needs root or CAP_SYS_ADMIN): "
                    f"{res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True, timeout=30)


@pytest.mark.parametrize("persister", [EquinoxPersister, OrbaxPersister])
def test_a_full_disk_says_so_names_the_folder_removes_its_files_and_keeps_older_checkpoints(
        small_disk: Path, persister: type) -> None:
    mgr = CheckpointManager(small_disk / "ckpts", persister(), keep=2)
    mgr.save(make_net(1, n=64), Cfg(), 1)  # a small checkpoint fits
    before = sorted(p.relative_to(small_disk) for p in small_disk.rglob("*"))
    big = make_net(2, n=1 << 18)  # 4 MiB of weights: does not fit
    with pytest.raises(DiskFullError, match=f"disk full: no space left in {mgr.directory}") as e:
        mgr.save(big, Cfg(), 2)
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.relative_to(small_disk) for p in small_disk.rglob("*")) == before  # no *.tmp, no orbax tmp
    assert mgr.restore(make_net(0, n=64), Cfg)[2] == 1
    assert mgr.save(make_net(3, n=64), Cfg(), 3) == mgr.path_for(3)  # and the folder is usable again


class _FullDisk:
    "A file object that accepts `room` bytes and then fails as a full disk does (errno, or numpy's message)."

    def __init__(self, f: object, room: int, numpy_style: bool) -> None:
        self._f, self._room, self._numpy_style = f, room, numpy_style

    def write(self, data: object) -> int:
        n = memoryview(data).nbytes
        if n > self._room:
            if self._numpy_style:
                raise OSError(f"{n} requested and {self._room} written")
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= n
        return self._f.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@pytest.mark.parametrize("numpy_style", [False, True], ids=["ENOSPC", "numpy-requested-and-written"])
def test_a_full_disk_seen_through_a_fault_injecting_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           numpy_style: bool) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(make_net(1), Cfg(), 1)
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real(fd, *a, **k), 4096, numpy_style))
    with pytest.raises(DiskFullError, match=f"disk full: no space left in {tmp_path}"):
        mgr.save(make_net(2), Cfg(), 2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_0000000001.eqx"]
    assert mgr.restore(LIKE, Cfg)[2] == 1

