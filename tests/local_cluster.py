"""A real multi-node Ray cluster on this machine, started the way users start one.

Each node is a ``ray start --block`` process with its own CPUs, temp dir and ports; the head runs
the dashboard (which serves ``ray job submit``) on loopback. Token auth is on, with a token of the
cluster's own passed through the environment (nothing is written to ``~/.ray``). ``stop`` ends only
the processes this cluster started (never ``ray stop``, which would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    def __init__(self, cpus_per_node: int = 2, nodes: int = 2, pythonpath: str | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="mmc-", dir="/tmp"))  # short: socket paths have a length limit
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        # The driver process must carry the same token before it imports ray (Ray caches its config).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Reports wait for the Train controller's poll; short polls keep per-step tests quick.
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
            # Each Train run would start one more actor process to watch for spot-node preemption (Ray 2.60's
            # default): nothing to watch on this machine, and one Python start-up per run on 2 cores.
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            # Ray Train's Prometheus metrics (for the dashboard; no test reads them): ~12% of the CPU time of a tiny
            # 2-worker run (25-28 CPU-seconds instead of 29-31), in its controller and workers. Drivers a test starts
            # itself read it from the test process's environment (tests/conftest.py).
            "RAY_TRAIN_METRICS_ENABLED": "0",
            # The cluster's own processes find it by this, not by looking for a Ray instance on the machine:
            # Ray Train's placement-group cleaner queries the state API, which fails when it finds several
            # (a developer's sweep beside the tests), and a paused trial's resources are then never freed.
            "RAY_ADDRESS": self.address,
        }
        if pythonpath:
            self.env["PYTHONPATH"] = pythonpath
        self.processes: list[subprocess.Popen] = []
        try:
            self._start_node(head=True, cpus=cpus_per_node)
            for _ in range(nodes - 1):
                self._start_node(head=False, cpus=cpus_per_node)
            self._wait_for_nodes(nodes)
        except BaseException:
            self.stop()
            raise

    def _start_node(self, head: bool, cpus: int) -> None:
        index = len(self.processes)
        command = [RAY, "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0", f"--temp-dir={self.root}/n{index}"]
        command += [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        if head:
            command += [
                "--head",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            command += [f"--address={self.address}", "--node-ip-address=127.0.0.1"]
        log = open(self.root / f"node{index}.log", "w")
        # A session of its own, so stop() can end the node's whole process group.
        self.processes.append(
            subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
        if head:
            self._wait_for_nodes(1)

    def _wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        probe = (
            f"import ray; ray.init(address='{self.address}', logging_level='ERROR', log_to_driver=False);"
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        while time.time() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a ray node exited early; see {self.root}/node*.log")
            result = subprocess.run(
                [sys.executable, "-c", probe], env=self.env, capture_output=True, text=True, timeout=60
            )
            if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} ray nodes did not come up in {timeout}s; see {self.root}/node*.log")

    def descendants(self):
        """Every process this cluster started (psutil objects)."""
        import psutil  # shipped with Ray

        found = []
        for process in self.processes:
            try:
                found += psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self) -> None:
        # Collected first: once a node's `ray start` process is gone, its orphans cannot be traced to it.
        started = self.descendants()
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.time() + 3  # `ray start --block` takes >15 s to stop gracefully; nothing here needs it
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Workers that left the process group (Ray daemonises a few helpers).
        import psutil  # shipped with Ray

        for child in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        shutil.rmtree(self.root, ignore_errors=True)
