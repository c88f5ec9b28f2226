"""The emulated cluster (flashcomm.bench.cluster): isolation, shaping, counters, faults, cleanup.

Real namespaces, a real bridge and real TCP between hosts; skipped (with the reason the module
gives) where there is no root or no iproute2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flashcomm.bench import cluster
from flashcomm.bench.cluster import Cluster

WHY = cluster.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")

SERVER = r"""
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 5000)); s.listen(1); print("up", flush=True)
c, _ = s.accept(); n = 0; t = time.perf_counter()
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
print(n, time.perf_counter() - t, flush=True)
"""
CLIENT = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5000), timeout=float(sys.argv[3]))
d = b"x" * (1 << 20); t = time.perf_counter()
for _ in range(int(sys.argv[2])): c.sendall(d)
c.close()
"""


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _send(c: Cluster, mib: int, timeout: float = 60.0) -> tuple[float, int]:
    """Host 0 sends `mib` MiB to a server on host 1: (seconds from the connection to the last
    byte, bytes received), as the server saw them."""
    srv = c.popen(1, [sys.executable, "-c", SERVER, c.addr(1)], stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and srv.stdout.readline().strip() == "up"
    r = c.run(0, [sys.executable, "-c", CLIENT, c.addr(1), str(mib), "10"], timeout=timeout)
    assert r.returncode == 0, r.stderr
    got, secs = srv.communicate(timeout=10)[0].split()
    return float(secs), int(got)


def test_hosts_link_counters_and_teardown() -> None:
    rate = 200.0  # Mbit/s: 8 MiB take about 0.34 s
    with Cluster(2, rate_mbit=rate, cores=[[0], [0]]) as c:
        names = _namespaces()
        assert c.ns(0) in names and c.ns(1) in names and c.switch in names
        # private /dev/shm per host, shared by the commands of one host; own addresses, cores
        c.run(0, ["touch", "/dev/shm/flashcomm-cluster-test"], timeout=10)
        assert c.run(0, ["ls", "/dev/shm"], timeout=10).stdout.split() == [
            "flashcomm-cluster-test"]
        assert c.run(1, ["ls", "/dev/shm"], timeout=10).stdout.split() == []
        assert not os.path.exists("/dev/shm/flashcomm-cluster-test")
        show = c.run(1, ["ip", "-4", "-o", "addr", "show", "eth0"], timeout=10).stdout
        assert f"{c.addr(1)}/24" in show
        assert c.addr(1) not in subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True,
                                               text=True).stdout
        aff = c.run(1, [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                    timeout=30).stdout.strip()
        assert aff == "[0]"
        assert c.run(0, ["cat", "/sys/class/net/eth0/mtu"], timeout=10).stdout.strip() == "1500"

        before = c.counters(0), c.counters(1)
        secs, got = _send(c, 8)
        sent0, sent1 = c.counters(0) - before[0], c.counters(1) - before[1]
        assert got == 8 << 20
        # payload as the counters see it: within 0.5% of what the application sent
        assert abs(sent0.payload() - got) < 0.005 * got, (sent0, got)
        assert abs(sent1.rx_bytes - sent0.tx_bytes) < 0.001 * got  # host 1 received it
        assert sent1.payload() < 0.01 * got  # the other way: ACKs only
        mbit = got * 8 / secs / 1e6
        assert mbit < 1.15 * rate, f"{mbit:.0f} Mbit/s through a {rate:.0f} Mbit/s link"

        # a switch port that silently drops: the client's connect times out
        c.set_link(1, "drop")
        r = c.run(0, [sys.executable, "-c", CLIENT, c.addr(1), "1", "1"], timeout=30)
        assert r.returncode != 0 and "timed out" in r.stderr
        c.set_link(1, "down")
        assert "NO-CARRIER" in c.run(1, ["ip", "link", "show", "eth0"], timeout=10).stdout
        c.set_link(1, "up")
        assert _send(c, 1)[1] == 1 << 20
        c.popen(1, ["sleep", "1000"])  # left running: close() must end it
        holders = c.pids(0) + c.pids(1)
    assert c.ns(0) not in _namespaces() and c.switch not in _namespaces()
    time.sleep(0.2)
    for pid in holders:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read()


def test_stale_cluster_of_a_killed_owner_is_swept() -> None:
    code = ("import time; from flashcomm.bench.cluster import Cluster\n"
            "c = Cluster(2); c.start(); print(c.tag, flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    tag = owner.stdout.readline().strip()
    assert f"{tag}-h1" in _namespaces()
    os.kill(owner.pid, signal.SIGKILL)  # no atexit, no close()
    owner.wait()
    swept = cluster.sweep_stale()
    assert f"{tag}-h0" in swept and f"{tag}-sw" in swept
    assert tag not in _namespaces()
