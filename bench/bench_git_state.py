"""get_git_state on a generated repository of 10k files (100 modified, 20 untracked) against
`git status --porcelain` in the same run. Target: at most 3x the time of `git status`."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from researchlab.tracking.utils import get_git_state

TARGET = 3.0
N_FILES, N_MODIFIED, N_UNTRACKED, REPEATS = 10_000, 100, 20, 25


def make_repo(root: Path, env: dict[str, str]) -> Path:
    repo = root / "repo"
    for i in range(N_FILES):
        d = repo / f"pkg{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i:05d}.py").write_text(f"# module {i}\n" + "x = 1\n" * 20)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    for i in range(0, N_FILES, N_FILES // N_MODIFIED):
        with open(repo / f"pkg{i // 100:03d}" / f"mod{i:05d}.py", "a") as f:
            f.write("y = 2\n")
    for i in range(N_UNTRACKED):
        (repo / f"pkg{i:03d}" / f"new{i}.py").write_text("z = 3\n")
    return repo


def median_ms(f: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> int:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com", "GIT_CONFIG_GLOBAL": os.devnull}
    with tempfile.TemporaryDirectory(prefix="bench-git-") as tmp:
        t0 = time.perf_counter()
        repo = make_repo(Path(tmp), env)
        print(f"generated {N_FILES} files, {N_MODIFIED} modified, {N_UNTRACKED} untracked in {time.perf_counter() - t0:.1f} s")
        status = lambda: subprocess.run(["git", "status", "--porcelain"], cwd=repo, env=env, check=True,
                                        capture_output=True)
        changed = status().stdout.decode().splitlines()
        state = get_git_state(repo)
        n_patched = state["patch"].count("diff --git ")
        if len(changed) != N_MODIFIED + N_UNTRACKED or n_patched != N_MODIFIED + N_UNTRACKED:
            print(f"setup error: git status shows {len(changed)} changes, the patch {n_patched}")
            return 2
        baseline, ours = [], []
        for _ in range(3):  # interleaved rounds: both see the same machine load
            baseline.append(median_ms(status))
            ours.append(median_ms(lambda: get_git_state(repo)))
        base, mine = min(baseline), min(ours)
    ratio = mine / base
    print(f"git status --porcelain: {base:.1f} ms   get_git_state: {mine:.1f} ms   ratio {ratio:.2f}x "
          f"(target <= {TARGET:.0f}x; medians of {REPEATS}, best of 3 rounds)")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
