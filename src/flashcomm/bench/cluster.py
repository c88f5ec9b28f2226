"""An emulated cluster on one Linux machine: K hosts joined by one shaped link each.

Each host is a network namespace with its own loopback, its own `eth0`, a private `/dev/shm` and
its own host name `host<i>` (mount and UTS namespaces with a tmpfs, held open by one sleeping
process per host, so every command started on a host shares that host's /dev/shm and sees that
host's /sys/class/net). The hosts'
`eth0` are veth pairs plugged into a bridge that lives in a namespace of its own (the switch),
with one MTU on every interface; each host's egress is shaped by tbf to the given rate, with a
bucket of about 1 ms of that rate (a larger bucket lets whole messages cross at memory speed).
The interfaces keep the kernel's GSO: a counted packet is then one TCP segment of up to 64 KiB
with one set of headers, so `LinkCounters.payload()` (bytes less headers per packet) is the TCP
payload to within 0.01%; with `gso=False` every packet is one wire frame, but on a 2-core
machine the per-frame cost caps the link near 25 MB/s whatever the rate. No address or
interface is created outside the namespaces.

Needs root with iproute2 (`ip`, `tc`, `bridge`), `unshare`, `nsenter` and `taskset`;
`unavailable()` says in one line what is missing. Names are `fcc<owner pid>-h<i>` / `-sw`, so
clusters of concurrent processes never collide; `close()` (also at interpreter exit) kills every
process inside the namespaces and deletes them, and `sweep_stale()` (run by every new cluster)
deletes those whose owner process has died, e.g. after a SIGKILL.

Usage from another module::

    from flashcomm.bench.cluster import Cluster

    with Cluster(hosts=2, rate_mbit=2000) as c:          # cores split between the hosts
        before = c.counters(0)                           # LinkCounters of host 0's eth0
        p1 = c.popen(1, ["python", "-m", "my.server", "--host", c.addr(1)])
        out = c.run(0, ["python", "-c", "print(1)"], timeout=60)   # CompletedProcess
        sent = c.counters(0) - before                    # .tx_bytes, .tx_packets, .payload()
        c.set_link(1, "down")                            # "up" | "down" | "drop" (silent)
        env = c.env(0)                                   # GLOO_SOCKET_IFNAME=eth0 etc.

`popen(i, argv)` runs argv on host i pinned to its cores (`taskset`), in a new session (so
`close()` can kill it whole), with `env(i)` added to the environment.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IFACE = "eth0"
"""The link interface inside every host."""
SUBNET = "10.213.0"
"""Host i has address SUBNET.(i+1)/24, inside its namespace only."""
FRAME_OVERHEAD = 14 + 20 + 32
"""Bytes of framing per frame the link counters include: Ethernet header (14; veth counters
leave out preamble and FCS), IPv4 (20), TCP with the timestamp option (32, Linux's default)."""
LINK_STATES = ("up", "down", "drop")
_NAME = re.compile(r"^fcc(\d+)-(h\d+|sw)$")
_TOOLS = ("ip", "tc", "bridge", "unshare", "nsenter", "taskset")


@dataclass(frozen=True)
class LinkCounters:
    """One interface's counters (/sys/class/net/IF/statistics), or a difference of two."""

    tx_bytes: int
    tx_packets: int
    rx_bytes: int
    rx_packets: int

    def __sub__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(self.tx_bytes - other.tx_bytes, self.tx_packets - other.tx_packets,
                            self.rx_bytes - other.rx_bytes, self.rx_packets - other.rx_packets)

    def payload(self) -> int:
        """TCP payload bytes sent: tx_bytes less FRAME_OVERHEAD per packet (an estimate: SACK
        options on some ACKs add a few bytes each)."""
        return self.tx_bytes - FRAME_OVERHEAD * self.tx_packets


def unavailable() -> str | None:
    """None when clusters can be built here, else one line saying what is missing."""
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network and mount namespaces)"
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return f"the emulated cluster needs {', '.join(missing)} (iproute2, util-linux)"
    probe = f"fcc{os.getpid()}-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if r.returncode:
        return f"the emulated cluster cannot create a network namespace: {r.stderr.strip()}"
    return None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")
    return r


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process inside network namespace `ns`, then delete it."""
    for _ in range(50):
        pids = [int(p) for p in _sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    _sh("ip", "netns", "del", ns, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces of clusters whose owner process is gone; return their names."""
    gone = []
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _kill_namespace(name)
            gone.append(name)
    return gone


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def tbf_burst(rate_mbit: float, mtu: int) -> int:
    """tbf bucket in bytes: about 1 ms of the rate, and never below two frames."""
    return max(int(rate_mbit * 1e6 / 8 * 1e-3), 2 * (mtu + 14))


class Cluster:
    """K emulated hosts (network + mount namespaces) on one bridge, egress shaped by tbf."""

    def __init__(self, hosts: int, rate_mbit: float | None = None, mtu: int = 1500,
                 cores: Sequence[Sequence[int]] | None = None, shm_mb: int = 4096,
                 gso: bool = True) -> None:
        if hosts < 1 or hosts > 200:
            raise ValueError(f"hosts={hosts}: must be in 1..200")
        self.hosts = hosts
        self.rate_mbit = rate_mbit
        self.mtu = mtu
        avail = sorted(os.sched_getaffinity(0))
        if cores is None:  # a contiguous share of the cores each; shared when there are fewer
            per = max(1, len(avail) // hosts)
            cores = [[avail[(i * per + j) % len(avail)] for j in range(per)]
                     for i in range(hosts)]
        if len(cores) != hosts or not all(cores):
            raise ValueError(f"cores={cores!r}: need a non-empty core list for each of the "
                             f"{hosts} hosts")
        self.cores = [list(c) for c in cores]
        self.shm_mb = shm_mb
        self.gso = gso
        self.tag = f"fcc{os.getpid()}"
        self._holders: list[subprocess.Popen] = []
        self._procs: list[subprocess.Popen] = []
        self._up = False

    # ---- names ----------------------------------------------------------------------------

    def ns(self, i: int) -> str:
        """Network namespace name of host i."""
        return f"{self.tag}-h{i}"

    @property
    def switch(self) -> str:
        """Network namespace of the bridge."""
        return f"{self.tag}-sw"

    def hostname(self, i: int) -> str:
        """Host name of host i (its own UTS namespace)."""
        return f"host{i}"

    def addr(self, i: int) -> str:
        """IPv4 address of host i (exists only inside the cluster)."""
        return f"{SUBNET}.{i + 1}"

    def env(self, i: int) -> dict[str, str]:
        """Variables a distributed program on host i needs: gloo's and NCCL's interface, the
        host's address (vLLM's VLLM_HOST_IP), and OpenMP/torch threads = the host's cores."""
        n = str(len(self.cores[i]))
        return {"GLOO_SOCKET_IFNAME": IFACE, "NCCL_SOCKET_IFNAME": IFACE,
                "VLLM_HOST_IP": self.addr(i), "OMP_NUM_THREADS": n, "FLASHCOMM_HOST": str(i)}

    # ---- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Create the switch, the hosts, their links and shaping; start each host's holder."""
        why = unavailable()
        if why:
            raise RuntimeError(why)
        sweep_stale()
        atexit.register(self.close)
        self._up = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        sw = self.switch
        _sh("ip", "netns", "add", sw)
        _sh("ip", "-n", sw, "link", "add", "br0", "mtu", str(self.mtu), "type", "bridge")
        for i in range(self.hosts):
            ns = self.ns(i)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", sw, "link", "add", f"p{i}", "mtu", str(self.mtu), "type", "veth",
                "peer", "name", IFACE, "netns", ns)
            for where, dev in ((sw, f"p{i}"), (ns, IFACE)):
                gso = () if self.gso else ("gso_max_segs", "1")
                _sh("ip", "-n", where, "link", "set", dev, "mtu", str(self.mtu), *gso)
            _sh("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", IFACE)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "link", "set", IFACE, "up")
            if self.rate_mbit:
                self.set_rate(i, self.rate_mbit)
        _sh("ip", "-n", sw, "link", "set", "br0", "up")
        for i in range(self.hosts):
            self._holders.append(self._holder(i))

    def _holder(self, i: int) -> subprocess.Popen:
        """A sleeping process that keeps host i's mount namespace: its own tmpfs /dev/shm and
        the sysfs of its network namespace (`ip netns exec` mounts that)."""
        script = (f"hostname {self.hostname(i)} && "
                  f"mount -t tmpfs -o size={self.shm_mb}m tmpfs /dev/shm && echo ready && "
                  "exec sleep infinity")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(i), "unshare", "--mount", "--uts",
                              "--propagation", "private", "sh", "-c", script],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_die_with_parent)
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            err = p.stderr.read() if p.stderr else ""
            raise RuntimeError(f"host {i}: could not set up its /dev/shm: {err.strip()}")
        return p

    def close(self) -> None:
        """Kill every process on every host, then delete the namespaces; idempotent."""
        if not self._up:
            return
        self._up = False
        for p in self._procs:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
        for i in range(self.hosts):
            _kill_namespace(self.ns(i))
        _kill_namespace(self.switch)
        for p in self._procs + self._holders:
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        atexit.unregister(self.close)

    # ---- commands -------------------------------------------------------------------------

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run on host i: its namespaces, pinned to its cores."""
        if not self._holders:
            raise RuntimeError("the cluster is not started (use `with Cluster(...)` or start())")
        holder = self._holders[i].pid
        return ["nsenter", "-t", str(holder), "-n", "-m", "-u", f"--wd={os.getcwd()}", "--",
                "taskset", "-c", ",".join(map(str, self.cores[i])), *argv]

    def popen(self, i: int, argv: Sequence[str], env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen:
        """Start argv on host i (its own session; killed by close()); returns the Popen."""
        full_env = {**os.environ, **self.env(i), **(env or {})}
        p = subprocess.Popen(self.command(i, argv), env=full_env, start_new_session=True,
                             **kwargs)
        self._procs.append(p)
        return p

    def run(self, i: int, argv: Sequence[str], timeout: float, env: dict[str, str] | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """Run argv on host i to completion (killed at `timeout`); output captured as text."""
        p = self.popen(i, argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       **kwargs)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(p.args, timeout, out, err) from None
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def pids(self, i: int) -> list[int]:
        """Every process inside host i, the holder included."""
        return [int(p) for p in _sh("ip", "netns", "pids", self.ns(i), check=False).stdout.split()]

    # ---- the link -------------------------------------------------------------------------

    def counters(self, i: int) -> LinkCounters:
        """Host i's eth0 counters, read through its holder's view of its own sysfs."""
        base = f"/proc/{self._holders[i].pid}/root/sys/class/net/{IFACE}/statistics"

        def read(name: str) -> int:
            with open(f"{base}/{name}") as f:
                return int(f.read())

        return LinkCounters(read("tx_bytes"), read("tx_packets"), read("rx_bytes"),
                            read("rx_packets"))

    def set_rate(self, i: int, rate_mbit: float) -> None:
        """Shape host i's egress to rate_mbit (tbf, bucket of ~1 ms of the rate)."""
        burst = tbf_burst(rate_mbit, self.mtu)
        _sh("tc", "-n", self.ns(i), "qdisc", "replace", "dev", IFACE, "root", "tbf", "rate",
            f"{round(rate_mbit * 1000)}kbit", "burst", str(burst), "latency", "50ms")

    def set_link(self, i: int, state: str) -> None:
        """Host i's switch port: `up`, `down` (carrier lost on both ends), or `drop` (the port
        stays up and silently discards every frame, like a dead switch port)."""
        if state not in LINK_STATES:
            raise ValueError(f"state={state!r}: expected one of {', '.join(LINK_STATES)}")
        port = f"p{i}"
        if state == "down":
            _sh("ip", "-n", self.switch, "link", "set", port, "down")
            return
        _sh("ip", "-n", self.switch, "link", "set", port, "up")
        # bridge port state 0 = disabled (discards every frame), 3 = forwarding
        _sh("bridge", "-n", self.switch, "link", "set", "dev", port, "state",
            "0" if state == "drop" else "3")


def add_arguments(parser: Any) -> None:
    """Options of `flashcomm bench cluster`."""
    parser.add_argument("--sweep", action="store_true",
                        help="delete namespaces left by clusters whose owner process died")


def main(args: Any) -> int:
    """Say whether clusters can be built here; with --sweep, delete stale ones."""
    why = unavailable()
    print(why or "emulated cluster: available (root, iproute2, namespaces)")
    if args.sweep and why is None:
        for name in sweep_stale():
            print(f"deleted stale namespace {name}")
    return 1 if why else 0
