"""run_local turns errors, hangs and dead ranks into prompt, readable failures, and leaves no
process behind; `flashcomm run` does the same, and ends on Ctrl-C with one line.

A rank is killed in each phase of a real run (rendezvous, group creation, loading, the series'
finalize, prefill, decode) from the test side: a profile hook or a forward hook in the rank
SIGKILLs it at that point. Group timeouts are 60 s, so only the launcher's own supervision can
end those runs within the 15 s the tests allow.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flashcomm.config import FlashCommConfig
from flashcomm.launch import RankFailure, run_local

VICTIM = 1
PHASES = ("rendezvous", "groups", "loading", "finalize", "prefill", "decode")
CFG = FlashCommConfig(tp=2, flashcomm2_otp=1, layer_sharding=("o_proj",))
REPORT_S = 15.0


def _echo(rank: int, world: int, tag: str) -> tuple[int, int, str]:
    return rank, world, tag


def _rank1_raises(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("bad knob on rank 1")
    dist.barrier()  # rank 0 would wait forever without the group timeout


def _rank1_skips_collective(rank: int, world: int) -> None:
    if rank == 0:
        dist.all_reduce(torch.ones(1))
    else:
        time.sleep(60)


def test_results_come_back_in_rank_order() -> None:
    assert run_local(_echo, 3, "x", timeout_s=60) == [(0, 3, "x"), (1, 3, "x"), (2, 3, "x")]


def test_a_raising_rank_fails_with_its_traceback_and_no_hang() -> None:
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)rank 1.*bad knob on rank 1") as info:
        run_local(_rank1_raises, 2, timeout_s=60, group_timeout_s=60)
    assert time.monotonic() - t0 < 30  # the launcher stops rank 0, not its group timeout
    assert info.value.rank == 1
    assert "raised ValueError: bad knob on rank 1" in str(info.value).splitlines()[0]
    _assert_gone(info.value.pids)


def test_a_diverging_rank_fails_within_the_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(RankFailure):
        run_local(_rank1_skips_collective, 2, timeout_s=15, group_timeout_s=5)
    assert time.monotonic() - t0 < 40


# ---- a rank killed in each phase --------------------------------------------------------------


def _die(stamp: str) -> None:
    """Note the time, then SIGKILL this rank: no cleanup, the kernel closes its sockets."""
    Path(stamp).write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_call(name: str, nth: int, stamp: str, inside: str | None = None) -> None:
    """From now on, die at the nth call of a Python function `name` (made from `inside`)."""
    calls = itertools.count(1)

    def profile(frame, event, arg) -> None:
        if event != "call" or frame.f_code.co_name != name:
            return
        outer = frame.f_back
        while inside is not None and outer is not None and outer.f_code.co_name != inside:
            outer = outer.f_back
        if (inside is None or outer is not None) and next(calls) == nth:
            _die(stamp)

    sys.setprofile(profile)


def _arm_rendezvous(stamp: str) -> str:
    """Runs where a spawned rank unpickles its arguments, before its rendezvous: rank VICTIM
    dies on entering init_process_group (that call's own `rank` argument says which rank)."""
    def profile(frame, event, arg) -> None:
        if event == "call" and frame.f_code.co_name == "init_process_group":
            if frame.f_locals.get("rank") == VICTIM:
                _die(stamp)
            sys.setprofile(None)

    sys.setprofile(profile)
    return stamp


class _KillInRendezvous:
    """A rank argument that unpickles, in the spawned rank, into `_arm_rendezvous(stamp)`."""

    def __init__(self, stamp: str) -> None:
        self.stamp = stamp

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return _arm_rendezvous, (self.stamp,)


def _phase_rank(rank: int, world: int, ckpt: str, phase: str, stamp: str) -> str:
    """Groups, engine, a short generation: rank VICTIM dies in `phase`."""
    from flashcomm.groups import ParallelGroups
    from flashcomm.models.engine import Engine

    victim = rank == VICTIM
    if victim and phase == "groups":
        _kill_on_call("new_group", 2, stamp)  # the first group exists, the second never will
    groups = ParallelGroups.from_config(CFG, world)
    if victim and phase == "loading":
        _kill_on_call("load_state_dict", 1, stamp)  # tensors read, the model not yet built
    if victim and phase == "finalize":
        _kill_on_call("broadcast", 2, stamp, inside="finalize")  # layer 0 sent, layer 1 not
    engine = Engine.from_checkpoint(ckpt, CFG, groups, progress=False)
    sys.setprofile(None)
    if victim and phase in ("prefill", "decode"):
        calls, die_at = itertools.count(1), 1 if phase == "prefill" else 2
        engine.model.layers[1].register_forward_pre_hook(
            lambda module, args: _die(stamp) if next(calls) == die_at else None)
    engine.generate([[1, 2, 3, 4, 5]], 4)
    return "finished"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 layers of width 64, long positions (the CLI tests decode for a while)."""
    from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", small_llama_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=8192))


@pytest.mark.parametrize("phase", PHASES)
def test_a_rank_killed_in_any_phase_is_reported_within_seconds(
        phase: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    stamp = str(tmp_path / "killed_at")
    arg = _KillInRendezvous(stamp) if phase == "rendezvous" else stamp
    with pytest.raises(RankFailure) as info:
        run_local(_phase_rank, 2, str(tiny_checkpoint), phase, arg, timeout_s=60,
                  group_timeout_s=60)
    took = time.time() - float(Path(stamp).read_text())
    e, lines = info.value, str(info.value).splitlines()
    assert took < REPORT_S, f"reported {took:.1f}s after the kill:\n{e}"
    assert e.rank == VICTIM and e.exitcodes[VICTIM] == -signal.SIGKILL, str(e)
    where = "during rendezvous" if phase == "rendezvous" else "while running _phase_rank"
    assert f"rank 1 (pid {e.pids[1]}) killed by signal SIGKILL (9)" in lines[0], lines[0]
    assert where in lines[0], lines[0]
    survivor = next(ln for ln in lines if ln.startswith(f"  rank 0 (pid {e.pids[0]}): "))
    assert "Error" in survivor or "killed by the launcher" in survivor, survivor
    _assert_gone(e.pids)


# ---- flashcomm run: a dead rank, Ctrl-C ------------------------------------------------------


def _procs() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every process, from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
            if fields[0] != "Z":
                out[int(d)] = (int(fields[1]), int(fields[2]))
    return out


def _assert_gone(pids: tuple[int, ...] | list[int], groups: tuple[int, ...] = ()) -> None:
    """No process left with one of `pids`, or in their process groups or `groups`."""
    left: dict[int, tuple[int, int]] = {}
    for _ in range(50):  # a resource tracker may take a moment to see its parent go
        left = {p: v for p, v in _procs().items()
                if p in pids or v[1] in pids or v[1] in groups}
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes left behind (pid: ppid, pgid): {left}")


def _ranks_of(pid: int) -> list[int]:
    """The spawned ranks under process `pid`."""
    out = []
    for p, (ppid, _) in _procs().items():
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if ppid == pid and b"--multiprocessing-fork" in cmd:
            out.append(p)
    return sorted(out)


def _interruptible() -> None:
    """SIGINT back to its default in the child, as a terminal's shell leaves it: a test run
    started in the background (`make test &`) inherits SIGINT ignored, and Python then installs
    no KeyboardInterrupt handler, so Ctrl-C could not be tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Cli:
    """`flashcomm run --nproc 2` in a session of its own, stderr collected as it comes."""

    def __init__(self, ckpt: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flashcomm.cli", "run", "--model", str(ckpt), "--nproc", "2",
             "--token-ids", "1,2,3", "--max-new-tokens", "8000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True, preexec_fn=_interruptible)
        self.err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read(1):
            self.err.append(chunk)

    def generating(self, timeout_s: float = 60.0) -> list[int]:
        """Wait until both ranks exist and the loading bar is done; return their pids."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            text = "".join(self.err)
            ranks = _ranks_of(self.proc.pid)
            if len(ranks) == 2 and "100%" in text and text.rstrip(" ").endswith("\n"):
                time.sleep(1.0)
                return ranks
            time.sleep(0.1)
        raise AssertionError(f"no generation within {timeout_s}s: {''.join(self.err)}")

    def finish(self) -> tuple[int, str]:
        """Exit code and stderr, waiting at most the report time."""
        rc = self.proc.wait(timeout=REPORT_S + 30)
        self._reader.join(timeout=5)
        return rc, "".join(self.err)


def test_run_cli_reports_a_killed_rank(tiny_checkpoint: Path) -> None:
    cli = _Cli(tiny_checkpoint)
    try:
        ranks = cli.generating()
        os.kill(ranks[-1], signal.SIGKILL)
        t0 = time.monotonic()
        rc, err = cli.finish()
    finally:
        cli.proc.kill()
    assert time.monotonic() - t0 < REPORT_S, err
    assert rc not in (0, None), err
    summary = err.split("--- rank")[0]
    assert f"(pid {ranks[-1]}) killed by signal SIGKILL (9)" in summary, err
    assert "Traceback" not in summary, err
    _assert_gone(ranks, (cli.proc.pid,))


def test_run_cli_ctrl_c_ends_every_rank_with_one_line(tiny_checkpoint: Path) -> None:
    cli = _Cli(tiny_checkpoint)
    try:
        ranks = cli.generating()
        before = len("".join(cli.err))
        os.killpg(cli.proc.pid, signal.SIGINT)  # what a terminal sends to its foreground group
        t0 = time.monotonic()
        rc, err = cli.finish()
    finally:
        cli.proc.kill()
    assert time.monotonic() - t0 < REPORT_S, err
    assert rc == 130, err
    assert "Traceback" not in err, err
    assert err[before:].strip().splitlines() == ["flashcomm run: interrupted"], err[before:]
    _assert_gone(ranks, (cli.proc.pid,))
