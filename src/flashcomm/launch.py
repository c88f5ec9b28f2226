"""Run a function on N local ranks (gloo on CPU, NCCL on CUDA) or under torchrun.

`run_local` is the one place that spawns processes: tests, benchmarks and the engine all use it,
so every spawned group gets the same supervision, error report and process-group timeout.

Supervision. A gloo or NCCL collective blocks on a dead peer until the group timeout fires, so
the launcher does not wait for the ranks to notice: it watches every rank's process sentinel and
result pipe at once. When a rank raises or dies, the others get `grace_s` to report their own
error (a peer's broken connection usually surfaces at once); whoever is still running then has
its Python stack dumped (faulthandler on SIGUSR1) and is killed with its whole process group.
Each rank runs in its own process group and dies with the launcher (PR_SET_PDEATHSIG on Linux),
so a Ctrl-C, a timeout or a killed launcher leaves no process behind.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashcomm.knobs import FlashCommError

DEFAULT_GROUP_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = 3.0
"""Seconds the other ranks get to report their own error once one rank has failed."""
_DUMP_WAIT_S = 1.0
_STACK_SIGNAL = signal.SIGUSR1


class RankFailure(FlashCommError, RuntimeError):
    """A spawned rank raised, died or timed out: the message names each rank, its pid, how it
    ended and its last error; `rank` is the rank that failed first (None: a timeout)."""

    def __init__(self, message: str, rank: int | None = None, pids: tuple[int, ...] = (),
                 exitcodes: tuple[int | None, ...] = ()) -> None:
        super().__init__(message)
        self.rank = rank
        """The rank that failed first (died, or raised earliest); None when none did."""
        self.pids = pids
        """Process id of each rank, by rank."""
        self.exitcodes = exitcodes
        """Exit code of each rank as multiprocessing reports it (-N: killed by signal N)."""


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(rank: int, world: int, backend: str | None = None,
                     group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
                     init_method: str | None = None) -> torch.device:
    """Initialise the default group (env:// unless `init_method` is given); return the device."""
    backend = backend or default_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, init_method=init_method,
                            timeout=timedelta(seconds=group_timeout_s),
                            device_id=device if backend == "nccl" else None)
    return device


# ---- the rank side ----------------------------------------------------------------------------


def _die_with_launcher(launcher_pid: int) -> None:
    """Own process group (the launcher kills it whole), and SIGKILL when the launcher dies."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        os._exit(1)


def _send(conn: Connection, *msg: Any) -> None:
    conn.send_bytes(pickle.dumps(msg))  # plain pickle: tensors travel by value


def _worker(rank: int, world: int, init_method: str, backend: str, group_timeout_s: float,
            threads: int, conn: Connection, stack_file: str, launcher_pid: int,
            fn: Callable[..., Any], args: tuple) -> None:
    _die_with_launcher(launcher_pid)
    dump = open(stack_file, "w")  # noqa: SIM115 - open for the whole life of the rank
    faulthandler.register(_STACK_SIGNAL, file=dump, all_threads=True)
    torch.set_num_threads(threads)
    phase = "rendezvous"
    try:
        _send(conn, "phase", phase)
        init_distributed(rank, world, backend, group_timeout_s, init_method)
        phase = "run"
        _send(conn, "phase", phase)
        _send(conn, "ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - the launcher reports it with the rank attached
        _send(conn, "error", phase, time.time(), traceback.format_exc())
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a failed peer may already be gone
                dist.destroy_process_group()


# ---- the launcher side ------------------------------------------------------------------------


@dataclass
class _Rank:
    """What the launcher knows about one spawned rank."""

    rank: int
    proc: Any
    conn: Connection | None
    stack_file: str
    phase: str = "start-up"
    has_result: bool = False
    result: Any = None
    error: str | None = None
    error_time: float = 0.0
    exitcode: int | None = None
    noticed: float = 0.0
    stopped: str = ""
    stack: str = ""

    @property
    def done(self) -> bool:
        """Sent its result or error, or ended."""
        return self.has_result or self.error is not None or self.exitcode is not None

    @property
    def died(self) -> bool:
        """Ended on its own without sending a result or an error."""
        return (self.exitcode is not None and not self.has_result and self.error is None
                and not self.stopped)

    def receive(self) -> None:
        """Read one message from the rank (EOF closes the pipe)."""
        assert self.conn is not None
        try:
            msg = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            self.conn = None
            return
        except Exception:  # noqa: BLE001 - e.g. a result class the launcher cannot import
            msg = ("error", self.phase, time.time(), "the launcher could not unpickle the "
                   f"result:\n{traceback.format_exc()}")
        if msg[0] == "phase":
            self.phase = msg[1]
        elif msg[0] == "ok":
            self.has_result, self.result = True, msg[1]
        else:
            _, self.phase, self.error_time, self.error = msg
            self.noticed = time.monotonic()

    def reap(self) -> None:
        """The process ended: take what it still sent, then its exit code."""
        while self.conn is not None and self.conn.poll(0):
            self.receive()
        self.proc.join()
        self.exitcode = self.proc.exitcode
        self.noticed = self.noticed or time.monotonic()

    def kill(self) -> None:
        """SIGKILL the rank's process group (its children too), then the rank itself."""
        if self.proc.pid is None:  # never started
            return
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.exitcode is None:
            self.proc.kill()


def _supervise(ranks: list[_Rank], timeout_s: float, grace_s: float) -> None:
    """Wait until every rank reported or ended, `grace_s` after a failure, or `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    stop_at = None
    while not all(r.done for r in ranks):
        if stop_at is None and any(r.error is not None or r.died for r in ranks):
            stop_at = min(deadline, time.monotonic() + grace_s)
        remaining = (stop_at or deadline) - time.monotonic()
        if remaining <= 0:
            return
        watch: dict[Any, _Rank] = {}
        for r in ranks:
            if not r.done:
                watch[r.proc.sentinel] = r
                if r.conn is not None:
                    watch[r.conn] = r
        for ready in wait(list(watch), timeout=min(remaining, 1.0)):
            r = watch[ready]
            if ready is r.conn:
                r.receive()
            elif r.exitcode is None:
                r.reap()


def _stop(ranks: list[_Rank], why: str) -> None:
    """Dump the Python stack of each rank (faulthandler), then kill it and its children."""
    dumping = [r for r in ranks if r.phase != "start-up"]  # the handler is registered by then
    for r in dumping:
        with contextlib.suppress(OSError):
            os.kill(r.proc.pid, _STACK_SIGNAL)
    t_end = time.monotonic() + _DUMP_WAIT_S
    while dumping and time.monotonic() < t_end:
        time.sleep(0.1)  # faulthandler writes a dump at once, from its C signal handler
        if all(os.path.getsize(r.stack_file) for r in dumping):
            break
    for r in ranks:
        with contextlib.suppress(OSError), open(r.stack_file) as f:
            r.stack = f.read().strip()
        r.stopped = why
        r.kill()
        r.proc.join(timeout=5.0)
        r.exitcode = r.proc.exitcode


def _status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else "?"
        return f"killed by signal {name} ({-code})"
    return f"exited with code {code}"


def _where(stack: str) -> str:
    """The innermost frame of the thread that runs the rank's function, from a faulthandler
    dump: '  File "x.py", line 3 in f' -> 'f (x.py:3)'."""
    for block in stack.split("\n\n"):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip().startswith("File ")]
        if lines and any(ln.endswith(" in _worker") for ln in lines):
            path, _, rest = lines[0][len('File "'):].partition('", line ')
            line, _, func = rest.partition(" in ")
            return f"{func} ({os.path.basename(path)}:{line})"
    return "an unknown place (no stack dump)"


def _phase(r: _Rank, fn_name: str) -> str:
    return {"start-up": "during start-up", "rendezvous": "during rendezvous"}.get(
        r.phase, f"while running {fn_name}")


def _report(ranks: list[_Rank], fn_name: str, timeout_s: float) -> RankFailure:
    """One line per rank (first the one that failed first), then tracebacks and stacks."""
    died = sorted((r for r in ranks if r.died), key=lambda r: r.noticed)
    raised = sorted((r for r in ranks if r.error is not None), key=lambda r: r.error_time)
    first = (died or raised or [None])[0]
    nfail = len(died) + len(raised)
    if first is None:
        head = f"{len(ranks)} ranks did not all finish within {timeout_s:.0f}s"
    else:
        how = (_status(first.exitcode) + " with no error reported" if first.died
               else "raised " + first.error.strip().splitlines()[-1])
        head = (f"{nfail} of {len(ranks)} ranks failed: rank {first.rank} (pid {first.proc.pid}) "
                f"{how} {_phase(first, fn_name)}")
    lines, details = [head], []
    for r in ([first] if first else []) + [r for r in ranks if r is not first]:
        who = f"rank {r.rank} (pid {r.proc.pid})"
        if r.error is not None:
            lines.append(f"  {who}: {r.error.strip().splitlines()[-1]} ({_phase(r, fn_name)})")
            details.append(f"--- rank {r.rank} ---\n{r.error.rstrip()}")
        elif r.died:
            lines.append(f"  {who}: {_status(r.exitcode)} {_phase(r, fn_name)}, no error "
                         f"reported")
        elif r.stopped:
            lines.append(f"  {who}: {r.stopped}; killed by the launcher {_phase(r, fn_name)}, in "
                         f"{_where(r.stack)}")
            if r.stack:
                details.append(f"--- rank {r.rank}: Python stack when killed ---\n{r.stack}")
        else:
            lines.append(f"  {who}: finished")
    return RankFailure("\n".join(lines + details), None if first is None else first.rank,
                       tuple(r.proc.pid for r in ranks), tuple(r.exitcode for r in ranks))


# glibc serves tensors above its mmap threshold (at most 32 MiB by default) with fresh mmaps and
# returns them on free, so every large temporary (all-to-all receive buffers, all-gather
# outputs, padded copies) page-faults again on each call: measured 41 ms to allocate and fill a
# [8192, 2048] fp32 tensor against 6.6 ms to copy into a warm one. That penalised the composed
# collectives against gloo's in-place all_reduce. Keeping freed memory in the heap (what CUDA's
# caching allocator does on GPUs) removes the artifact; a user's own setting is kept.
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 35), "MALLOC_TRIM_THRESHOLD_": str(1 << 35)}


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, for the processes started inside; restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank_env(backend: str) -> dict[str, str]:
    """Spawned CPU ranks get CPU_MALLOC_ENV (glibc reads it at process start) unless set."""
    if backend != "gloo":
        return {}
    return {k: v for k, v in CPU_MALLOC_ENV.items() if k not in os.environ}


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker, which the ranks share, unless it runs already.
    A rank the launcher SIGKILLs cannot release its named semaphores (multiprocessing locks such
    as tqdm's); the tracker unlinks them when the launcher exits, and is told not to warn about
    these expected leaks (a Ctrl-C would otherwise end in two lines of warnings)."""
    from multiprocessing import resource_tracker

    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    old = os.environ.get("PYTHONWARNINGS")
    with _environ({"PYTHONWARNINGS": f"{old},{quiet}" if old else quiet}):
        resource_tracker.ensure_running()


class _InitFailure(RankFailure):
    """Process-group initialisation raised on some rank and no rank died: worth a restart."""


def run_local(fn: Callable[..., Any], nproc: int, *args: Any, backend: str = "gloo",
              timeout_s: float = 300.0, group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
              threads_per_rank: int | None = None, init_retries: int = 2,
              grace_s: float = DEFAULT_GRACE_S) -> list[Any]:
    """Call `fn(rank, world, *args)` on `nproc` spawned ranks and return their results by rank.

    `fn` must be importable (module level) and its result picklable. Raises RankFailure when a
    rank raises or dies (the others are stopped `grace_s` later at most), or when the ranks do not
    all finish within `timeout_s`. A group whose rendezvous raised (gloo's full-mesh connect can
    time out on an overloaded machine) is started again, up to `init_retries` times. On Ctrl-C
    every rank is killed before KeyboardInterrupt propagates."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: must be >= 1")
    for attempt in range(init_retries + 1):
        try:
            return _run_once(fn, nproc, args, backend, timeout_s, group_timeout_s,
                             threads_per_rank, grace_s)
        except _InitFailure as e:
            if attempt == init_retries:
                raise RankFailure(str(e), e.rank, e.pids, e.exitcodes) from None
    raise AssertionError("unreachable")


def _run_once(fn: Callable[..., Any], nproc: int, args: tuple, backend: str, timeout_s: float,
              group_timeout_s: float, threads_per_rank: int | None,
              grace_s: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    # a file rendezvous cannot race with other process groups for a TCP port
    store_dir = tempfile.mkdtemp(prefix="flashcomm-store-")
    init_method = f"file://{os.path.join(store_dir, 'store')}"
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
    ranks: list[_Rank] = []
    try:
        _start_resource_tracker()
        with _environ(_rank_env(backend)):
            for r in range(nproc):
                reader, writer = ctx.Pipe(duplex=False)
                stack_file = os.path.join(store_dir, f"rank{r}.stack")
                proc = ctx.Process(target=_worker, daemon=True, args=(
                    r, nproc, init_method, backend, group_timeout_s, threads, writer, stack_file,
                    os.getpid(), fn, args))
                ranks.append(_Rank(r, proc, reader, stack_file))
                proc.start()
                writer.close()  # the rank holds the only writer: its death reads as EOF
        _supervise(ranks, timeout_s, grace_s)
        first = next((r for r in ranks if r.error is not None or r.died), None)
        running = [r for r in ranks if not r.done]
        if running:
            why = (f"no error {grace_s:.0f}s after rank {first.rank} failed" if first
                   else f"still running after {timeout_s:.0f}s")
            _stop(running, why)
        if first is None and not running:
            return [r.result for r in ranks]
        failure = _report(ranks, getattr(fn, "__name__", "fn"), timeout_s)
        init_only = all(r.phase == "rendezvous" for r in ranks if r.error is not None)
        if first is not None and init_only and not any(r.died for r in ranks):
            raise _InitFailure(str(failure), failure.rank, failure.pids, failure.exitcodes)
        raise failure
    finally:
        ok = all(r.has_result for r in ranks)
        for r in ranks:
            r.proc.join(timeout=5.0 if ok else 0.5)
            r.kill()  # also sweeps up anything the rank left in its process group
            r.proc.join()
            if r.conn is not None:
                r.conn.close()
        shutil.rmtree(store_dir, ignore_errors=True)
