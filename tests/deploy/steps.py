"""Run the steps of a deploy/<mode>/commands.sh verbatim, as a user would, and stop what they start.

A commands file is a list of steps, each introduced by ``# step: NAME (where it runs)``; a step is
the shell text up to the next blank line. Tests substitute only ports and folders: through the
variables the ``settings`` step exports, and a SuperNode's ``--port``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import silotune

REPO = Path(__file__).resolve().parents[2]
STEP = re.compile(r"^# step: (\S+)")


def read_steps(commands: Path) -> dict[str, str]:
    """``{name: shell text}`` of a commands file, comment lines dropped, in file order."""
    steps: dict[str, str] = {}
    name: str | None = None
    for line in commands.read_text(encoding="utf-8").splitlines():
        if match := STEP.match(line):
            name = match.group(1)
            steps[name] = ""
        elif not line.strip():
            name = None
        elif name is not None and not line.startswith("#"):
            steps[name] += line + "\n"
    return {k: v.strip() for k, v in steps.items()}


def exported(settings: str) -> list[str]:
    """The variable names a settings step exports."""
    return re.findall(r"\b([A-Z_]+)=", settings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(variables: dict[str, str]) -> dict[str, str]:
    """This interpreter's scripts first on PATH, and this checkout's silotune importable.

    `silotune`, `flwr` and `flower-*` are the scripts next to this Python; PYTHONPATH makes them
    (and the Flower processes they spawn) import the silotune under test, whether it is installed
    editable (CI) or not.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    package_root = str(Path(silotune.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.update(variables)
    return env


class Processes:
    """Background steps, each in its own session, stopped by their process-group id at the end."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def run(self, name: str, text: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """A step that ends by itself; its output is kept in ``<name>.log``."""
        result = subprocess.run(
            ["bash", "-c", f"set -eo pipefail\n{text}"],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        (self.cwd / f"{name}.log").write_text(result.stdout + result.stderr)
        return result

    def start(self, name: str, text: str) -> subprocess.Popen[bytes]:
        """A long-running step (one command, exec'd so that its PID is the command's)."""
        log = (self.cwd / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {text}"],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its children (SuperExec, app processes) share its group
        )
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.cwd / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM each started process group by its PID, then SIGKILL what is left after 20 s."""
        for proc in self.started.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.started.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
            except ProcessLookupError:
                pass
            proc.wait()


def wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on {host}:{port} after {timeout} s")


def assert_peft_adapter(folder: Path) -> None:
    """The folder is a PEFT LoRA adapter that plain PEFT loads onto tiny-llama."""
    from peft import PeftModel

    from silotune.models.loading import load_model

    assert (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()
    base = load_model("tiny-llama", "cpu", "float32").model
    model = PeftModel.from_pretrained(base, folder)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def assert_serves_tls(host: str, port: int, ca: Path) -> None:
    """The port completes a TLS handshake whose certificate chains to `ca` and names `host`."""
    import ssl

    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((host, port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


@contextlib.contextmanager
def deployment(
    mode: str, folder: Path, variables: dict[str, str]
) -> Iterator[tuple[dict[str, str], Processes]]:
    """deploy/<mode>'s YAMLs copied into `folder`, its steps, and the processes to run them in;
    on leaving, every started process group is stopped by its PID and checked to be gone."""
    for yaml in (REPO / "deploy" / mode).glob("*.yaml"):
        shutil.copy(yaml, folder)
    procs = Processes(folder, environment(variables))
    try:
        yield read_steps(REPO / "deploy" / mode / "commands.sh"), procs
    finally:
        procs.stop_all()
    for name, proc in procs.started.items():
        assert proc.poll() is not None, f"{name} still runs"
