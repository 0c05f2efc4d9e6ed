"""A real JupyterLab on 127.0.0.1 for the browser tests: started on a free port with its own config folders, stopped
(the whole process group) afterwards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOKEN = "rlab-test-token"


def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def jupyter_lab(tmp_path: Path,  # holds the lab's config folders and `lab.log`
                root: Path,  # the folder JupyterLab serves
                notebook: str,  # the notebook (relative to root) whose URL is yielded
                env: Mapping[str, str] | None = None,  # the server's environment (default: this process's)
                ) -> Iterator[str]:
    "Start JupyterLab serving `root`; yield the URL that opens `notebook` (token included); stop it afterwards."
    conf = tmp_path / "jupyter"
    settings = conf / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port = free_port()
    env = {**(os.environ if env is None else env),
           "JUPYTER_CONFIG_DIR": str(conf / "config"), "JUPYTER_RUNTIME_DIR": str(conf / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(conf / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(conf / "ws"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
    log_path = tmp_path / "lab.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                             "--ServerApp.ip=127.0.0.1", f"--ServerApp.token={TOKEN}", "--allow-root",
                             f"--ServerApp.root_dir={root}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.3)
        yield f"{url}/lab/tree/{notebook}?token={TOKEN}"
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")


def launch_chromium(pw: object) -> object:
    "Debian's chromium, headless, driven by playwright `pw` (never a downloaded browser)."
    return pw.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
