"""Child processes of the benchmark: start, wait until ready, account CPU, stop.

Every child dies with the benchmark (PR_SET_PDEATHSIG) and is stopped in
reverse order, so no process outlives a run.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.stack import die_with_parent, stop_process, wait_connect, wait_http

__all__ = ["Procs", "system_busy", "tree_cpu", "wait_connect", "wait_http"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, cpu seconds) of one process, from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK


def system_busy() -> float:
    """CPU seconds the whole machine has spent not idle (all processes, ours or not)."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by `root` and its live descendants."""
    return sum(tree_cpu_by_pid(root).values())


def tree_cpu_by_pid(root: int) -> dict[int, float]:
    """CPU seconds used so far by `root` and each of its live descendants."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents[int(entry)], cpu[int(entry)] = st
    out: dict[int, float] = {}
    stack: list[int] = [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        if pid in out:
            continue
        out[pid] = cpu.get(pid, 0.0)
        stack.extend(children.get(pid, ()))
    return out


@dataclass
class Procs:
    """The children of one configuration; `role` groups them for CPU accounting."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[tuple[str, str, subprocess.Popen[Any]]] = field(default_factory=list)

    def spawn(self, name: str, role: str, args: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.Popen[Any]:
        with open(self.workdir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env, **(env or {})},
                cwd=cwd,
                preexec_fn=die_with_parent,
            )
        self.procs.append((name, role, proc))
        return proc

    def log(self, name: str) -> str:
        p = self.workdir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for _, role, proc in self.procs:
            if proc.poll() is None:
                out[role] = out.get(role, 0.0) + tree_cpu(proc.pid)
        return out

    def cpu_by_pid(self, role: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for _, r, proc in self.procs:
            if r == role and proc.poll() is None:
                out.update(tree_cpu_by_pid(proc.pid))
        return out

    def check_alive(self) -> None:
        for name, _, proc in self.procs:
            if proc.poll() is not None:
                tail = self.log(name)[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self, name: str | None = None) -> None:
        for n, role, proc in reversed(list(self.procs)):
            if name is not None and n != name:
                continue
            stop_process(proc)
            self.procs.remove((n, role, proc))
