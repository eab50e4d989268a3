"""Shared machinery of fisherguard's benchmarks (docs/performance.md §9).

Process-tree CPU time and memory from ``/proc``, the busy check that drops repetitions disturbed
by foreign processes, robust statistics, the system report and the JSON-lines writer. Nothing here
imports torch at module level: the caller must pin the thread environment before torch loads.
Linux only (``/proc``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUSY_THRESHOLD = 0.06  # share of total CPU capacity foreign processes may use (docs/performance.md §9)


def cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def pin_threads(n: int) -> None:
    """Set the OpenMP/MKL thread counts; they only take effect if torch is not imported yet."""
    if "torch" in sys.modules:
        raise RuntimeError("pin_threads must run before torch is imported")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


# ---------------------------------------------------------------------------------------------
# process tree: CPU time and PSS


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state, field 3 of proc(5))."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()  # the command name may contain spaces and parentheses


def _children(pid: int) -> list[int] | None:
    """Direct children of ``pid`` from /proc/<pid>/task/*/children; None when the kernel lacks it."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread just ended
            return None  # CONFIG_PROC_CHILDREN off
        except (ProcessLookupError, PermissionError):
            continue
        out.extend(int(v) for v in text.split())
    return out


def tree_pids(root: int | None = None) -> list[int]:
    """``root`` (default: this process) and all its live descendants."""
    root = os.getpid() if root is None else root
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        kids = _children(pid)
        if kids is None:
            return _tree_pids_by_scan(root)
        todo.extend(kids)
    return out


def _tree_pids_by_scan(root: int) -> list[int]:
    """The same from the parent ids of every process (slower; kernels without task children)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        f = _stat_fields(int(entry.name))
        if f is not None:
            children.setdefault(int(f[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_ticks(root: int | None = None) -> int:
    """CPU ticks used so far by the process tree, including children already reaped.

    utime + stime + cutime + cstime of every live member: a reaped child's time sits in its
    parent's cutime/cstime, so nothing is counted twice or lost.
    """
    total = 0
    for pid in tree_pids(root):
        f = _stat_fields(pid)
        if f is not None:
            total += sum(int(v) for v in f[11:15])
    return total


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine from /proc/stat; steal counts as busy."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in parts[1:9])
    busy = user + nice + system + irq + softirq + steal  # guest time is already inside user
    return busy, busy + idle + iowait


def tree_pss_bytes(root: int | None = None) -> int:
    """Summed proportional set size of the process tree (pages shared after fork counted once)."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # a worker that just exited
    return total


class PssSampler:
    """Samples the tree's summed PSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_pss_bytes())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_pss_bytes())


# ---------------------------------------------------------------------------------------------
# repetitions with the busy check


@dataclass
class Sample:
    seconds: float
    foreign: float  # foreign share of total machine capacity during the repetition
    busy: bool  # kept although above the threshold (no quiet redo was possible)
    result: Any = None


def timed_with_foreign(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``'s result, its wall seconds, and foreign processes' share of the machine meanwhile."""
    b0, t0 = machine_ticks()
    own0 = tree_cpu_ticks()
    w0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - w0
    own1 = tree_cpu_ticks()
    b1, t1 = machine_ticks()
    return result, seconds, max(0, (b1 - b0) - (own1 - own0)) / max(t1 - t0, 1)


def foreign_share(seconds: float) -> float:
    """Foreign processes' share of the machine over an idle wait of ``seconds``."""
    return timed_with_foreign(lambda: time.sleep(seconds))[2]


@dataclass
class Repeater:
    """Times callables with the busy check of docs/performance.md §9.

    A repetition during which foreign processes used more than ``threshold`` of the machine is
    discarded and redone, but only once the machine is quiet again (a 1 s window under the
    threshold within ``quiet_wait`` seconds): a redo under the same load would be disturbed the
    same way. After one fruitless wait the load counts as persistent and later busy repetitions
    are kept without waiting, until a repetition comes out clean. At most ``max_attempts`` per
    repetition and ``redo_budget`` redos in total; when any limit is reached the least disturbed
    attempt is kept and flagged busy, so a loaded machine lengthens the benchmark by a bounded
    amount only.
    """

    threshold: float = BUSY_THRESHOLD
    max_attempts: int = 3
    redo_budget: int = 10
    quiet_wait: float = 20.0
    dropped: int = 0
    kept_busy: int = 0
    log: TextIO | None = sys.stdout
    persistent: bool = False  # the last wait for a quiet machine found none

    def _quiet(self) -> bool:
        deadline = time.monotonic() + self.quiet_wait
        while time.monotonic() < deadline:
            if foreign_share(1.0) <= self.threshold:
                return True
        return False

    def measure(self, label: str, fn: Callable[[], Any]) -> Sample:
        best: Sample | None = None
        for attempt in range(self.max_attempts):
            result, seconds, foreign = timed_with_foreign(fn)
            s = Sample(seconds, foreign, False, result)
            if foreign <= self.threshold:
                self.persistent = False
                if best is not None:
                    self.dropped += 1  # the earlier, more disturbed attempt
                return s
            if best is None or foreign < best.foreign:
                if best is not None:
                    self.dropped += 1
                best = s
            else:
                self.dropped += 1
            why = ""
            if attempt + 1 == self.max_attempts:
                why = "attempts exhausted"
            elif self.redo_budget <= 0:
                why = "redo budget spent"
            elif self.persistent:
                why = "machine persistently busy"
            elif not self._quiet():
                self.persistent = True
                why = f"machine still busy after {self.quiet_wait:.0f} s"
            if self.log:
                what = f"kept ({why})" if why else "dropped, redoing"
                print(f"    busy: {label}: foreign load {foreign:.0%} of capacity > "
                      f"{self.threshold:.0%}; {what}", file=self.log, flush=True)
            if why:
                break
            self.redo_budget -= 1
        assert best is not None
        best.busy = True
        self.kept_busy += 1
        return best


@dataclass
class Stats:
    values: list[float] = field(default_factory=list)
    busy: int = 0

    def add(self, s: Sample) -> None:
        self.values.append(s.seconds)
        self.busy += int(s.busy)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def text(self, unit: str = "s", digits: int = 2) -> str:
        flag = f"  [{self.busy} busy]" if self.busy else ""
        return (f"{self.median:.{digits}f} {unit} (min {self.min:.{digits}f}, "
                f"max {self.max:.{digits}f}, n={len(self.values)}){flag}")


# ---------------------------------------------------------------------------------------------
# report


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def system_info() -> dict[str, Any]:
    """CPU, ISA level, core count, thread settings, library versions and load (docs/performance.md §9)."""
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            flwr = version("flwr")
        except PackageNotFoundError:
            flwr = None
    except ImportError:
        flwr = None
    return {
        "cpu": model,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cores": cores(),
        "torch": torch.__version__,
        "flwr": flwr,
        "python": platform.python_version(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }


def print_system(info: dict[str, Any], out: TextIO = sys.stdout) -> None:
    print(f"CPU      {info['cpu']}  ({info['cores']} cores usable, ISA {info['isa']})", file=out)
    print(f"threads  OMP_NUM_THREADS={info['OMP_NUM_THREADS']} MKL_NUM_THREADS="
          f"{info['MKL_NUM_THREADS']}  torch default {info['torch_threads']}", file=out)
    print(f"versions python {info['python']}, torch {info['torch']} (oneDNN "
          f"{'on' if info['mkldnn'] else 'off'}), flwr {info['flwr'] or 'not installed'}", file=out)
    la = info["loadavg"]
    print(f"load     {la[0]} {la[1]} {la[2]} (1/5/15 min) at start", file=out)


class JsonLines:
    """One JSON object per measured figure: name, value, unit, target, pass, settings."""

    def __init__(self, path: Path, run: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = path.open("a")
        self.run = run

    def write(self, name: str, value: float | None, unit: str, *, target: str | None = None,
              ok: bool | None = None, settings: dict[str, Any] | None = None,
              **extra: Any) -> None:
        rec = {"name": name, "value": value, "unit": unit, "target": target, "pass": ok,
               "settings": settings or {}, **extra, "run": self.run}
        self._fh.write(json.dumps(rec, sort_keys=False, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


# ---------------------------------------------------------------------------------------------
# a loopback-only network namespace (Ray binds ports on every interface, docs/flower.md §8.0)

NETNS_VAR = "FISHERGUARD_BENCH_NETNS"


def rerun_in_netns() -> int | None:
    """Run this script again, without ``--netns``, inside a private network namespace that has
    only loopback (root, or user namespaces) and return its exit code; None inside it already."""
    if os.environ.get(NETNS_VAR) == "1":
        return None
    ns = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    argv = [a for a in sys.argv[1:] if a != "--netns"]
    return subprocess.call(ns + ["sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                                 sys.executable, *sys.argv[:1], *argv],
                           env={**os.environ, NETNS_VAR: "1"})
