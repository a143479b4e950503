"""A container as a supervised local process: restarts with backoff, probes, last log lines.

The kubelet's timings (probe periods, restart backoff of 10 s doubling to 5 min) are kept and
multiplied by ``time_scale`` so a test's pods behave the same, only faster.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.kubelet.pods import ContainerPlan

__all__ = ["Container", "ContainerState"]

log = logging.getLogger(__name__)

BACKOFF_START = 10.0
BACKOFF_MAX = 300.0


@dataclass
class ContainerState:
    running: bool = False
    ready: bool = False
    restarts: int = 0
    last_exit_code: int | None = None
    last_reason: str = ""
    last_log: str = ""
    finished: bool = False
    """Exited and will not be restarted (restartPolicy Never/OnFailure satisfied)."""


class Container:
    def __init__(self, plan: ContainerPlan, pod_ip: str, log_path: Path, restart_policy: str,
                 time_scale: float, grace_seconds: float = 30.0) -> None:
        self.plan = plan
        self.pod_ip = pod_ip
        self.log_path = log_path
        self.restart_policy = restart_policy
        self.scale = time_scale
        self.grace = grace_seconds
        self.state = ContainerState()
        self._stop = threading.Event()
        self._kill_now = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, daemon=True,
                                        name=f"container-{plan.name}")

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after the grace period (capped by ``timeout``)."""
        self._stop.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.grace if timeout is None else min(self.grace, timeout))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(10)

    def kill(self) -> int | None:
        """SIGKILL the running process (a crash); the supervisor restarts it. Returns its pid."""
        with self._lock:
            process = self._process
        if process is None or process.poll() is not None:
            return None
        process.kill()
        return process.pid

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._process is None else self._process.pid

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ----------------------------------------------------------------- supervision

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.plan.cwd.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            out.write(f"--- start {' '.join(self.plan.argv)}\n".encode())
            out.flush()
            return subprocess.Popen(self.plan.argv, env=self.plan.env, cwd=self.plan.cwd,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _supervise(self) -> None:
        backoff = BACKOFF_START
        while not self._stop.is_set():
            try:
                process = self._spawn()
            except OSError as exc:
                self.log_path.open("a").write(f"cannot start: {exc}\n")
                process = None
            started = time.monotonic()
            if process is not None:
                with self._lock:
                    self._process = process
                self.state.running = True
                reason = self._watch(process)
                code = process.wait()
            else:
                reason, code = "StartError", 128
            self.state.running = False
            self.state.ready = False
            self.state.last_exit_code = code
            self.state.last_reason = reason or ("Completed" if code == 0 else "Error")
            self.state.last_log = self.tail()
            if self._stop.is_set():
                break
            if self.restart_policy == "Never" or (self.restart_policy == "OnFailure"
                                                  and code == 0):
                self.state.finished = True
                break
            self.state.restarts += 1
            log.info("container %s exited (%s, code %s); restart %d in %.1fs; last lines:\n%s",
                        self.plan.name, self.state.last_reason, code, self.state.restarts,
                        backoff * self.scale, self.state.last_log)
            if time.monotonic() - started > 600:
                backoff = BACKOFF_START
            if self._stop.wait(backoff * self.scale):
                break
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _watch(self, process: subprocess.Popen[bytes]) -> str:
        """Poll the probes until the process exits; kill it when liveness fails. Returns the
        kill reason ('' when it exited by itself)."""
        readiness, liveness, startup = self.plan.readiness, self.plan.liveness, self.plan.startup
        started = time.monotonic()
        next_ready = started + self._period(readiness, "initialDelaySeconds", 0)
        next_live = started + self._period(liveness, "initialDelaySeconds", 0)
        live_failures = 0
        ready_failures = 0
        startup_done = startup is None
        while process.poll() is None:
            now = time.monotonic()
            if not startup_done and startup is not None:
                startup_done = self._probe(startup)
            if readiness is None:
                self.state.ready = startup_done
            elif startup_done and now >= next_ready:
                ok = self._probe(readiness)
                ready_failures = 0 if ok else ready_failures + 1
                ready = ok or (self.state.ready and ready_failures <
                               int(readiness.get("failureThreshold", 3)))
                self.state.ready = ready
                # Unlike the kubelet (periodSeconds between all probes), probe every 0.1 s until
                # the first success, so a test never waits a period for readiness.
                next_ready = now + (self._period(readiness, "periodSeconds", 10)
                                    if self.state.ready else 0.1)
            if liveness is not None and startup_done and now >= next_live:
                live_failures = 0 if self._probe(liveness) else live_failures + 1
                next_live = now + self._period(liveness, "periodSeconds", 10)
                if live_failures >= int(liveness.get("failureThreshold", 3)):
                    with self.log_path.open("a") as out:
                        out.write("--- liveness probe failed: killing\n")
                    process.kill()
                    return "LivenessProbeFailed"
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(0.05)
        return ""

    def _period(self, probe: dict[str, Any] | None, key: str, default: float) -> float:
        if probe is None:
            return 0.0
        return float(probe.get(key, default)) * self.scale

    def _port(self, value: Any) -> int:
        if isinstance(value, int) or str(value).isdigit():
            return int(value)
        return self.plan.ports[str(value)]

    def _probe(self, probe: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                spec = probe["httpGet"]
                host = spec.get("host") or self.pod_ip
                url = f"http://{host}:{self._port(spec['port'])}{spec.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return 200 <= response.status < 400
            if "tcpSocket" in probe:
                with socket.create_connection(
                        (self.pod_ip, self._port(probe["tcpSocket"]["port"])), timeout):
                    return True
            if "exec" in probe:
                result = subprocess.run(probe["exec"]["command"], env=self.plan.env,
                                        capture_output=True, timeout=timeout)
                return result.returncode == 0
        except (OSError, urllib.error.URLError, subprocess.SubprocessError, KeyError):
            return False
        return False

