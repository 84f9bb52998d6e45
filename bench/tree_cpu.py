"""Print the CPU seconds (user + system, children included) used so far by a
process and all its descendants, from /proc.

    python bench/tree_cpu.py PID
"""

from __future__ import annotations

import os
import sys


def table() -> dict[int, tuple[int, float]]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        out[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    return out


def tree_cpu(root: int) -> float:
    procs = table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            total += procs[pid][1]
        todo.extend(kids.get(pid, []))
    return total


if __name__ == "__main__":
    print(f"{tree_cpu(int(sys.argv[1])):.3f}")
