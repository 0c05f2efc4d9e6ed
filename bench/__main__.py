"""`make bench`: run every `bench/bench_*.py` in its own process and print their figures.

Each benchmark measures its own baseline in the same run and prints its result as a ratio against it
(speed targets live here, never in timed tests). `python -m bench NAME ...` runs only the named ones.
"""

import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    files = sorted(here.glob("bench_*.py"))
    if argv:
        files = [f for f in files if any(a in f.stem for a in argv)]
    failed = []
    for f in files:
        print(f"=== {f.stem} ===", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(f)], cwd=here.parent)
        print(f"--- {f.stem}: exit {rc}, {time.perf_counter() - t0:.1f} s\n", flush=True)
        if rc:
            failed.append(f.stem)
    if failed:
        print("benchmarks that missed their target or failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
