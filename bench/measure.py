"""Run one measured thing in a fresh child process and read its resource usage."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Sample:
    wall: float
    cpu: float  # user + system seconds of the child (and its waited-for children)
    rss_mb: float  # peak resident set of the child
    output: dict[str, Any] = field(default_factory=dict)


def run_child(
    argv: list[str],
    env: dict[str, str] | None = None,
    *,
    json_out: bool = False,
    stdout_null: bool = False,
    timeout: float = 3600,
) -> Sample:
    """Start ``argv``, wait with ``wait4`` for its rusage; fail on a non-zero exit."""
    out_path = ROOT / ".bench" / f"child-{os.getpid()}.out"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as out, open(str(out_path) + ".err", "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL if stdout_null else out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        hwm = 0
        while True:
            hwm = max(hwm, vm_hwm_kb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"{argv[:4]} timed out after {timeout}s")
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        msg = Path(str(out_path) + ".err").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(argv[:6])} exited {proc.returncode}: {msg}")
    output: dict[str, Any] = {}
    if json_out:
        text = out_path.read_text().strip().splitlines()
        output = json.loads(text[-1]) if text else {}
        hwm = max(hwm, int(output.get("vm_hwm_kb", 0)))
    return Sample(wall, usage.ru_utime + usage.ru_stime, hwm / 1024, output)


def vm_hwm_kb(pid: int | str = "self") -> int:
    """Peak RSS of the process image (``VmHWM``), 0 once it is gone.

    ``ru_maxrss`` cannot be used: Linux carries the parent's high-water mark across
    fork + exec into the child's figure, so every child would look as big as this
    orchestrator. ``VmHWM`` belongs to the exec'd image only; it is polled every few ms
    and Python targets report their own final value.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def py_target(name: str, args: dict[str, Any], env: dict[str, str] | None = None) -> Sample:
    """Run ``bench.targets.<name>`` in a fresh interpreter (JSON result on stdout)."""
    argv = [sys.executable, "-m", "bench.targets", name, json.dumps(args)]
    return run_child(argv, env, json_out=True)


@dataclass
class Stat:
    samples: list[Sample]

    @property
    def wall(self) -> float:
        return statistics.median(s.wall for s in self.samples)

    @property
    def cpu(self) -> float:
        return statistics.median(s.cpu for s in self.samples)

    @property
    def rss(self) -> float:
        return max(s.rss_mb for s in self.samples)

    @property
    def n(self) -> int:
        return len(self.samples)


def alternate(runners: dict[str, Any], repeats: int) -> dict[str, Stat]:
    """Run each runner ``repeats`` times, interleaved (A B C A B C ...)."""
    out: dict[str, list[Sample]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            s = fn()
            out[name].append(s)
            print(
                f"    {name:<28} wall {s.wall:7.2f}s  cpu {s.cpu:7.2f}s  rss {s.rss_mb:7.1f} MB",
                flush=True,
            )
    return {name: Stat(v) for name, v in out.items()}
