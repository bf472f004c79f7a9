"""Where a server's CPU time goes at saturation: per-thread CPU from /proc, and py-spy's
Python stacks, summarised.

    trex-bench --profile 10 ...        # runs profile_point during an extra saturated point

Two views, because neither is enough alone:

* /proc/<pid>/task/<tid>/stat: CPU seconds of every OS thread over the profile, named by
  py-spy's thread names (MainThread runs the asyncio loop and the gRPC handlers,
  trex-engine the scheduler and the ONNX Runtime calls) or by the kernel's (gRPC's own
  C++ threads, which py-spy cannot see into).
* py-spy's samples (``--native``: C and C++ frames too) of the Python threads: for each,
  the share of its samples by where the innermost frame is (self time), and the functions
  most often on the stack (inclusive time).

NOTE: py-spy does not recognise every blocking wait as idle (a futex inside libc shows up as
an unresolved libc address under pthread_cond_timedwait), so samples under a known waiting
call are put in their own category, "waiting"; the busy categories are what the thread's
CPU seconds are spent on. ``--native`` makes
py-spy pause the process for each sample, so a profiled point is slower than a measured one
and is not reported as throughput.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

log = logging.getLogger(__name__)

RATE_HZ = 200
WAITING = "waiting (epoll, locks, queues, the GIL)"
SYSCALLS = "syscalls: socket I/O, thread wake-ups"
_WAITS = {
    "epoll_wait",
    "epoll_pwait",  # libuv's (uvloop)
    "epoll_pwait2",
    "syscall",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "sem_wait",
    "sem_timedwait",
    "poll",
    "select",
    "nanosleep",
    "clock_nanosleep",
}
_IO = {
    "write",
    "read",
    "send",
    "sendmsg",
    "recv",
    "recvmsg",
    "pthread_cond_signal",
    "pthread_cond_broadcast",
    "sem_post",
    "getpid",
    "eventfd_write",
    "writev",
}
# CPython and the stdlib waiting for a lock, a queue or the GIL
_WAIT_CALLERS = {
    "PyThread_acquire_lock_timed",
    "_queue_SimpleQueue_get_impl",
    "take_gil",
    "select_epoll_poll_impl",
}
# (category, pattern on a frame's file); the first that matches the innermost frame wins
CATEGORIES = (
    ("onnxruntime", re.compile(r"onnxruntime")),
    ("numpy", re.compile(r"numpy/")),
    ("protobuf", re.compile(r"google/protobuf|_pb2")),
    ("prometheus_client", re.compile(r"prometheus_client/")),
    ("grpc", re.compile(r"grpc|\.pyx")),
    ("CPython interpreter", re.compile(r"libpython|python3\.\d+$")),
    ("service/engine.py", re.compile(r"service/engine\.py")),
    ("service/scheduler.py", re.compile(r"service/scheduler\.py")),
    ("service/server.py", re.compile(r"service/server\.py")),
    ("service/runtime.py", re.compile(r"service/runtime\.py")),
    ("service/metrics.py", re.compile(r"service/metrics\.py")),
    ("service/validation.py", re.compile(r"service/validation\.py")),
    ("bench (load generator)", re.compile(r"bench/")),
    ("asyncio", re.compile(r"asyncio/|selectors\.py")),
    ("threading, concurrent.futures", re.compile(r"threading\.py|concurrent/futures")),
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\d+)\): ?(?P<name>.*)$")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (kernel thread name, CPU seconds) for every thread of ``pid``."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    return out


def parse_raw(path: Path) -> list[tuple[int, str, list[tuple[str, str]], int]]:
    """py-spy ``--format raw --threads`` lines -> (tid, thread name, frames root first, n)."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        m = _THREAD.match(parts[0])
        tid, name = (int(m["tid"]), m["name"]) if m else (0, "?")
        frames = []
        for part in parts[1:]:
            f = _FRAME.match(part)
            frames.append((f["func"], f["file"]) if f else (part, ""))
        stacks.append((tid, name, frames, int(count)))
    return stacks


def category(frames: list[tuple[str, str]]) -> str:
    """Where a sample was: from the innermost frame outwards, the first frame that says
    something (libc internals and addresses py-spy could not name are passed over)."""
    for func, file in reversed(frames):
        libc = "libc.so" in file or "libpthread" in file
        if func in _WAITS or func in _WAIT_CALLERS:
            return WAITING
        if libc and func in _IO:
            return SYSCALLS
        if libc or not file:
            continue
        for name, pattern in CATEGORIES:
            if pattern.search(file):
                return name
        return "other"
    return "other"


def summarise(raw: Path, cpu_before: dict, cpu_after: dict, top: int = 15) -> dict:
    """Per thread: CPU seconds, and the busy samples by category and by function; and the
    process's CPU seconds split by category (each thread's CPU split by its busy shares)."""
    stacks = parse_raw(raw)
    names: dict[int, str] = {}
    self_by_thread: dict[int, Counter] = defaultdict(Counter)
    incl_by_thread: dict[int, Counter] = defaultdict(Counter)
    for tid, name, frames, n in stacks:
        names[tid] = name
        cat = category(frames)
        self_by_thread[tid][cat] += n
        if cat != WAITING:
            for func, file in {(f, Path(p).name) for f, p in frames}:
                incl_by_thread[tid][f"{func} ({file})"] += n
    threads = []
    cpu_by_category: Counter = Counter()
    for tid, (comm, after_s) in sorted(cpu_after.items()):
        cpu_s = after_s - cpu_before.get(tid, (comm, 0.0))[1]
        if cpu_s <= 0:
            continue
        entry = {"tid": tid, "name": names.get(tid, comm), "cpu_s": cpu_s}
        busy = {k: v for k, v in self_by_thread[tid].items() if k != WAITING}
        n_busy = sum(busy.values())
        if n_busy:
            entry["samples"] = sum(self_by_thread[tid].values())
            entry["busy_samples"] = n_busy
            entry["busy"] = {k: v / n_busy for k, v in Counter(busy).most_common()}
            entry["inclusive"] = {k: v / n_busy for k, v in incl_by_thread[tid].most_common(top)}
            for k, share in entry["busy"].items():
                cpu_by_category[k] += share * cpu_s
        else:
            # gRPC's C++ threads, which py-spy does not sample, or a thread that only waited
            cpu_by_category[f"thread {entry['name']} (not sampled)"] += cpu_s
        threads.append(entry)
    threads.sort(key=lambda t: -t["cpu_s"])
    return {
        "file": str(raw),
        "samples": sum(n for *_, n in stacks),
        "threads": threads,
        "cpu_by_category": dict(cpu_by_category.most_common()),
    }


def py_spy() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


async def profile_point(pid: int, raw: Path, seconds: float, load) -> dict:
    """Run the awaitable ``load`` while py-spy samples process ``pid`` for ``seconds``."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    cpu_before = thread_cpu(pid)
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(RATE_HZ),
        "--format",
        "raw",
        "--threads",
        "--native",
        "--output",
        str(raw),
    ]
    spy = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    point = await load
    try:
        _, err = await asyncio.wait_for(spy.communicate(), seconds + 30)
    except asyncio.TimeoutError:
        spy.kill()
        await spy.wait()
        raise RuntimeError("py-spy did not finish") from None
    cpu_after = thread_cpu(pid)
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode()[-500:]}")
    summary = summarise(raw, cpu_before, cpu_after)
    summary["window_s"] = point.window_s
    summary["answered"] = len([o for o in point.finished_in_window() if o.ok])
    return summary
