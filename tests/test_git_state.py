"""`get_git_state` in real temporary repositories: the user's index, untracked set and object store stay as
they were, and `git apply` of the patch on a clean checkout of the base commit rebuilds the tree byte for byte."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from researchlab.tracking.utils import GitState, GitStateWarning, clean_notebook, get_git_state, patch_bytes

pytestmark = pytest.mark.usefixtures("isolated_git")  # conftest: git identity and config for these tests only


def git(repo: Path, *args: str, input: bytes | None = None) -> bytes:
    r = subprocess.run(["git", *args], cwd=repo, input=input, capture_output=True)
    assert r.returncode == 0, f"git {' '.join(args)} failed: {r.stderr.decode()}"
    return r.stdout


def make_repo(path: Path, files: dict[str, bytes | str], commit: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    write(path, files)
    if commit:
        git(path, "add", "-A")
        git(path, "commit", "-qm", "init")
    return path


def write(repo: Path, files: dict[str, bytes | str]) -> None:
    for name, content in files.items():
        p = repo / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)


@dataclass
class Snapshot:
    "Everything of the user's repository that get_git_state must leave alone."
    index_file: bytes
    stage: bytes
    cached_diff: bytes
    untracked: bytes
    ignored: bytes
    objects: list[str]
    head: bytes


def snapshot(repo: Path) -> Snapshot:
    gitdir = Path(git(repo, "rev-parse", "--absolute-git-dir").decode().strip())
    common = Path(git(repo, "rev-parse", "--git-common-dir").decode().strip())
    common = common if common.is_absolute() else repo / common
    index = gitdir / "index"
    return Snapshot(
        index_file=index.read_bytes() if index.exists() else b"",
        stage=git(repo, "ls-files", "--stage", "-z"),
        cached_diff=git(repo, "diff", "--cached", "--binary"),
        untracked=git(repo, "ls-files", "--others", "--exclude-standard", "-z"),
        ignored=git(repo, "ls-files", "--others", "--ignored", "--exclude-standard", "-z"),
        objects=sorted(str(p.relative_to(common)) for p in (common / "objects").rglob("*")),
        head=(gitdir / "HEAD").read_bytes(),
    )


def tree_files(root: Path, paths: list[str]) -> dict[str, tuple[str, bytes, bool]]:
    "path -> (kind, content or link target, executable) for the given paths that exist."
    out = {}
    for p in paths:
        f = root / p
        if f.is_symlink():
            out[p] = ("link", os.readlink(f).encode(), False)
        elif f.is_file():
            out[p] = ("file", f.read_bytes(), bool(f.stat().st_mode & stat.S_IXUSR))
    return out


def expected_tree(repo: Path, skipped: set[str] = frozenset()) -> dict[str, tuple[str, bytes, bool]]:
    "The files the patch must reproduce: tracked plus untracked-not-ignored, minus those left out."
    names = git(repo, "ls-files", "--cached", "--others", "--exclude-standard", "-z").decode().split("\0")
    return tree_files(repo, [n for n in names if n and n not in skipped])


def apply_on_clean_checkout(repo: Path, state: GitState, dest: Path) -> Path:
    "A clean checkout of `state['base_commit']` (or an empty repo), with the patch applied to tree and index."
    if state["base_commit"] is None:
        dest.mkdir()
        git(dest, "init", "-q")
    else:
        git(repo.parent, "clone", "-q", "--no-checkout", str(repo), str(dest))
        git(dest, "checkout", "-q", "--detach", state["base_commit"])
    if state["patch"]:
        git(dest, "apply", "--index", "--binary", "-", input=patch_bytes(state))
    return dest


def checked_state(repo: Path, tmp_path: Path, **kwargs: object) -> tuple[GitState, Path]:
    "get_git_state with the invariants every scenario must satisfy."
    before = snapshot(repo)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = get_git_state(repo, **kwargs)
    assert state is not None, [str(w.message) for w in caught]
    assert snapshot(repo) == before, "get_git_state changed the index, untracked set, objects or HEAD"
    assert state["repo_root"] == str(repo.resolve())
    clone = apply_on_clean_checkout(repo, state, tmp_path / "clone")
    want = expected_tree(repo, set(state["skipped"]) | set(state["excluded"]))
    got = tree_files(clone, list(want) + [n for n in expected_tree(clone) if n not in want])
    assert got == want
    assert state["is_dirty"] == bool(state["patch"] or state["skipped"] or state["excluded"])
    return state, clone


# ---- the scenarios -----------------------------------------------------------------------------------------

def test_clean_repo_has_empty_patch(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    state, _ = checked_state(repo, tmp_path)
    assert state["patch"] == "" and state["is_dirty"] is False
    assert state["base_commit"] == git(repo, "rev-parse", "HEAD").decode().strip()
    assert state["branch"] == "main" and state["skipped"] == {} and state["submodules"] == {}


def test_binary_files_new_and_modified(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"model.bin": bytes(range(256)) * 4, "a.txt": "a\n"})
    write(repo, {"model.bin": bytes(reversed(range(256))) * 4, "new/weights.npy": os.urandom(3000) + b"\0"})
    state, _ = checked_state(repo, tmp_path)
    assert "GIT binary patch" in state["patch"] and "new/weights.npy" in state["patch"]


def test_rename_staged_and_unstaged(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"old.py": "x = 1\n" * 50, "other.py": "y = 2\n" * 50})
    git(repo, "mv", "old.py", "renamed.py")  # staged rename
    (repo / "other.py").rename(repo / "moved.py")  # rename only in the work tree
    state, clone = checked_state(repo, tmp_path)
    assert not (clone / "old.py").exists() and not (clone / "other.py").exists()


def test_delete_staged_and_unstaged(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n", "b.txt": "b\n", "c.txt": "c\n"})
    git(repo, "rm", "-q", "a.txt")
    (repo / "b.txt").unlink()
    state, clone = checked_state(repo, tmp_path)
    assert sorted(p.name for p in clone.iterdir() if p.name != ".git") == ["c.txt"]


def test_file_staged_then_modified_again(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"train.py": "lr = 1\n"})
    write(repo, {"train.py": "lr = 2\n"})
    git(repo, "add", "train.py")
    write(repo, {"train.py": "lr = 3\n"})  # the work tree wins
    state, clone = checked_state(repo, tmp_path)
    assert (clone / "train.py").read_text() == "lr = 3\n"
    assert git(repo, "show", ":train.py") == b"lr = 2\n"  # the user's staged version is still staged


def test_ignored_secret_and_data_folder_never_enter(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {".gitignore": ".env\ndata/\n", "a.txt": "a\n"})
    write(repo, {".env": "API_TOKEN=hunter2\n", "data/big.csv": "1,2,3\n", "notes.md": "ok\n"})
    (repo / ".git/info/exclude").write_text("scratch.txt\n")
    write(repo, {"scratch.txt": "private\n"})
    state, clone = checked_state(repo, tmp_path)
    assert "hunter2" not in state["patch"] and "data/big.csv" not in state["patch"]
    assert "private" not in state["patch"] and "notes.md" in state["patch"]
    assert not (clone / ".env").exists() and (clone / "notes.md").exists()


def test_large_untracked_file_is_left_out_and_listed(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    write(repo, {"dump/huge.bin": b"\1" * (5 * 2**20 + 1), "small.txt": "s\n"})
    with pytest.warns(GitStateWarning, match="dump/huge.bin"):
        state = get_git_state(repo)
    assert list(state["skipped"]) == ["dump/huge.bin"] and "MiB" in state["skipped"]["dump/huge.bin"]
    assert "huge.bin" not in state["patch"] and "small.txt" in state["patch"]
    # a smaller cap, configurable
    state, clone = checked_state(repo, tmp_path, max_untracked_bytes=1)
    assert set(state["skipped"]) == {"dump/huge.bin", "small.txt"} and state["is_dirty"]
    assert not (clone / "small.txt").exists()


def test_no_commits_diffs_against_the_empty_tree(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n", "bin.dat": b"\0\1\2"}, commit=False)
    git(repo, "add", "a.txt")  # one staged, one untracked
    state, clone = checked_state(repo, tmp_path)
    assert state["base_commit"] is None and state["branch"] == "main" and state["is_dirty"]
    assert (clone / "bin.dat").read_bytes() == b"\0\1\2"


def test_no_commits_and_empty_index(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n"}, commit=False)
    assert not (repo / ".git/index").exists()
    state, _ = checked_state(repo, tmp_path)
    assert "a.txt" in state["patch"]
    assert not (repo / ".git/index").exists()


def test_detached_head(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "v1\n"})
    first = git(repo, "rev-parse", "HEAD").decode().strip()
    write(repo, {"a.txt": "v2\n"})
    git(repo, "commit", "-qam", "v2")
    git(repo, "checkout", "-q", "--detach", first)
    write(repo, {"a.txt": "v3\n"})
    state, _ = checked_state(repo, tmp_path)
    assert state["base_commit"] == first and state["branch"] is None


def test_submodule_recorded_by_commit(tmp_path: Path) -> None:
    lib = make_repo(tmp_path / "lib", {"lib.py": "v = 1\n"})
    repo = make_repo(tmp_path / "repo", {"main.py": "import lib\n"})
    git(repo, "submodule", "add", "-q", str(lib), "vendor/lib")
    git(repo, "commit", "-qm", "add submodule")
    old = git(repo / "vendor/lib", "rev-parse", "HEAD").decode().strip()
    write(repo / "vendor/lib", {"lib.py": "v = 2\n"})
    git(repo / "vendor/lib", "commit", "-qam", "bump")  # the submodule moved to a new commit
    new = git(repo / "vendor/lib", "rev-parse", "HEAD").decode().strip()
    write(repo, {"main.py": "import lib  # v2\n"})
    write(repo / "vendor/lib", {"lib.py": "v = 3  # uncommitted in the submodule\n"})
    state, clone = checked_state(repo, tmp_path)
    assert old != new and state["submodules"] == {"vendor/lib": new}
    assert f"+Subproject commit {new}\n" in state["patch"] and "-dirty" not in state["patch"]
    assert git(clone, "ls-files", "--stage", "vendor/lib").decode().split()[1] == new


def test_not_a_repository_warns_once(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert get_git_state(plain) is None
        assert get_git_state(tmp_path / "missing") is None
    assert len(caught) == 2 and all(issubclass(w.category, GitStateWarning) for w in caught)
    assert str(plain) in str(caught[0].message)


def test_modes_symlinks_non_utf8_and_odd_names(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"run.sh": "echo hi\n", "a.txt": "a\n"})
    (repo / "run.sh").chmod(0o755)  # mode change only
    os.symlink("a.txt", repo / "link.txt")
    write(repo, {"latin1.txt": "caf\xe9\n".encode("latin-1"), "dir with space/ü ñ.txt": "unicode\n"})
    state, clone = checked_state(repo, tmp_path)
    assert os.access(clone / "run.sh", os.X_OK) and os.readlink(clone / "link.txt") == "a.txt"
    assert (clone / "latin1.txt").read_bytes() == b"caf\xe9\n"


def test_intent_to_add_and_hook_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    write(repo, {"ita.py": "planned\n"})
    git(repo, "add", "-N", "ita.py")  # intent-to-add stays intent-to-add in the user's index
    other = make_repo(tmp_path / "other", {"z.txt": "z\n"})
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))  # as inside a git hook of another repository
    monkeypatch.setenv("GIT_INDEX_FILE", str(other / ".git/index"))
    other_index = (other / ".git/index").read_bytes()
    state = get_git_state(repo)
    monkeypatch.delenv("GIT_DIR")
    monkeypatch.delenv("GIT_INDEX_FILE")
    assert (other / ".git/index").read_bytes() == other_index
    assert state["repo_root"] == str(repo.resolve())
    state, clone = checked_state(repo, tmp_path)
    assert (clone / "ita.py").read_text() == "planned\n"


def test_linked_worktree_and_credentials_stripped(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    git(repo, "remote", "add", "origin", "https://alice:ghp_SECRET@github.com/lab/repo.git")
    git(repo, "worktree", "add", "-q", "-b", "feature", str(tmp_path / "wt"))
    wt = tmp_path / "wt"
    write(wt, {"a.txt": "changed in the worktree\n", "new.txt": "n\n"})
    state, clone = checked_state(wt, tmp_path)
    assert state["branch"] == "feature" and state["remote_url"] == "https://github.com/lab/repo.git"
    assert "SECRET" not in repr(state)
    assert (repo / "a.txt").read_text() == "a\n"  # the main work tree is untouched


def test_subdirectory_path_finds_the_top_level(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"pkg/mod.py": "x\n"})
    write(repo, {"pkg/mod.py": "y\n", "top.txt": "t\n"})
    state = get_git_state(repo / "pkg")
    assert state["repo_root"] == str(repo.resolve()) and "top.txt" in state["patch"]


def test_remote_of_the_branch_upstream_is_preferred(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    git(repo, "remote", "add", "origin", "git@github.com:me/fork.git")
    git(repo, "remote", "add", "upstream", "ssh://git:pw@example.org/lab/repo.git")
    assert get_git_state(repo)["remote_url"] == "git@github.com:me/fork.git"
    git(repo, "config", "branch.main.remote", "upstream")
    assert get_git_state(repo)["remote_url"] == "ssh://git@example.org/lab/repo.git"


def test_racily_clean_edit_is_seen(tmp_path: Path) -> None:
    "A same-size edit that keeps the old mtime (a racily clean entry) still enters the patch."
    repo = make_repo(tmp_path / "repo", {"a.txt": "lr = 1e-3\n"})
    git(repo, "config", "core.trustctime", "false")
    st = (repo / "a.txt").stat()
    os.utime(repo / ".git/index", ns=(st.st_mtime_ns, st.st_mtime_ns))  # index written in the same instant
    (repo / "a.txt").write_text("lr = 3e-4\n")
    os.utime(repo / "a.txt", ns=(st.st_mtime_ns, st.st_mtime_ns))
    state, clone = checked_state(repo, tmp_path)
    assert "+lr = 3e-4" in state["patch"] and (clone / "a.txt").read_text() == "lr = 3e-4\n"


def test_untracked_but_committed_file(tmp_path: Path) -> None:
    "`git rm --cached`: the file is in HEAD, gone from the index, still on disk (untracked)."
    repo = make_repo(tmp_path / "repo", {"keep.txt": "k\n", "config.yaml": "lr: 1\n"})
    git(repo, "rm", "-q", "--cached", "config.yaml")
    write(repo, {"config.yaml": "lr: 2\n"})
    state, clone = checked_state(repo, tmp_path)
    assert (clone / "config.yaml").read_text() == "lr: 2\n"


def test_merge_conflict_in_progress(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "base\n"})
    git(repo, "checkout", "-q", "-b", "other")
    write(repo, {"a.txt": "other\n"})
    git(repo, "commit", "-qam", "other")
    git(repo, "checkout", "-q", "main")
    write(repo, {"a.txt": "mine\n"})
    git(repo, "commit", "-qam", "mine")
    r = subprocess.run(["git", "merge", "-q", "other"], cwd=repo, capture_output=True)
    assert r.returncode != 0  # conflicted: the index holds stages 1-3
    assert b" 1\ta.txt" in git(repo, "ls-files", "--stage")
    state, clone = checked_state(repo, tmp_path)
    assert "<<<<<<<" in (clone / "a.txt").read_text()


def test_corrupt_repository_warns_and_records_nothing(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    (repo / ".git/refs/heads/main").write_text("0" * 40 + "\n")  # HEAD points to a missing commit
    with pytest.warns(GitStateWarning, match="could not capture the git state"):
        assert get_git_state(repo) is None


# ---- notebooks: outputs stay out of the patch -------------------------------------------------------------

def notebook(*cells: tuple[str, str, str], **metadata: object) -> str:
    "A notebook as Jupyter writes it; cells are (id, source, stdout output or '')."
    def cell(cid: str, src: str, out: str, n: int | None) -> dict:
        return {"cell_type": "code", "execution_count": n, "id": cid, "metadata": {}, "source": src,
                "outputs": [{"output_type": "stream", "name": "stdout", "text": out}] if out else []}
    nb = {"cells": [cell(c, s, o, i + 1 if o else None) for i, (c, s, o) in enumerate(cells)], "metadata": metadata,
          "nbformat": 4, "nbformat_minor": 5}
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


KERNEL = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}


def test_notebook_outputs_stay_out_of_the_patch(tmp_path: Path) -> None:
    "Run notebooks: the patch holds their source edits only, applies on the base, and is exact for other files."
    committed = {"exp.ipynb": notebook(("a", "x = 1", ""), ("b", "print(x)", ""), **KERNEL),
                 "tutorial.ipynb": notebook(("t", "plot()", "a committed figure\n"), **KERNEL),
                 "train.py": "lr = 1\n"}
    repo = make_repo(tmp_path / "repo", committed)
    ran = {"exp.ipynb": notebook(("a", "x = 2", "y" * 100_000), ("b", "print(x)", "2\n"), ("c", "x + 1", "3\n"),
                                 kernelspec={}, language_info={"name": "python", "version": "3.11.9"}),
           "tutorial.ipynb": notebook(("t", "plot()", "a new figure\n"), **KERNEL),  # re-run: outputs changed only
           "new.ipynb": notebook(("n", "import os", "z" * 50_000), **KERNEL),
           "train.py": "lr = 2\n"}
    write(repo, ran)
    before = snapshot(repo)
    state = get_git_state(repo)
    assert snapshot(repo) == before, "get_git_state changed the index, untracked set, objects or HEAD"
    assert sorted(state["cleaned_notebooks"]) == ["exp.ipynb", "new.ipynb", "tutorial.ipynb"]
    assert len(patch_bytes(state)) < 4000 and "yyyy" not in state["patch"] and "zzzz" not in state["patch"]
    assert "tutorial.ipynb" not in state["patch"] and "+lr = 2" in state["patch"]
    clone = apply_on_clean_checkout(repo, state, tmp_path / "clone")
    assert (clone / "train.py").read_text() == "lr = 2\n"
    for name in ("exp.ipynb", "new.ipynb", "tutorial.ipynb"):
        got, work = json.loads((clone / name).read_text()), json.loads(ran[name])
        assert [c["source"] for c in got["cells"]] == [c["source"] for c in work["cells"]], name
        base = committed.get(name)
        assert got == json.loads(clean_notebook(ran[name].encode(), base.encode() if base else None)), name
    assert json.loads((clone / "exp.ipynb").read_text())["metadata"] == KERNEL  # the base's kernelspec, no language_info
    assert [c["outputs"] for c in json.loads((clone / "new.ipynb").read_text())["cells"]] == [[]]
    exact, clone = checked_state(repo, tmp_path / "exact", clean_notebooks=False)  # byte for byte when asked
    assert exact["cleaned_notebooks"] == [] and "yyyy" in exact["patch"]


def test_a_rerun_notebook_leaves_the_repository_clean(tmp_path: Path) -> None:
    "Running a committed notebook (new outputs, counts, JupyterLab's empty kernelspec) is no change to the code."
    repo = make_repo(tmp_path / "repo", {"nbs/t.ipynb": notebook(("t", "1 + 1", ""), **KERNEL)})
    write(repo, {"nbs/t.ipynb": notebook(("t", "1 + 1", "2\n"), kernelspec={})})
    state = get_git_state(repo)
    assert (state["patch"], state["is_dirty"], state["cleaned_notebooks"]) == ("", False, ["nbs/t.ipynb"])
