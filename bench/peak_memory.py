"""Peak anonymous memory of a command's process tree (issue 16's measure).

    python bench/peak_memory.py -- fastkd distill --data criteo:c1m.txt.gz ...

Samples every ``--interval`` seconds the sum of ``RssAnon`` (``/proc/<pid>/status``) over the
command and all its descendants: anonymous pages only, so the file-backed pages of memory-mapped
files (which the kernel can drop) are excluded, as are shared libraries. Prints the peak and the
wall time on the last line as JSON (``{"peak_rss_anon_mib": ..., "seconds": ..., "rc": ...}``) and
exits with the command's status. Linux only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List


def _children() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # the comm field may hold spaces and parentheses: the ppid is the 2nd field after the last ')'
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def rss_anon_kib(root: int) -> int:
    """RssAnon (KiB) summed over ``root`` and its descendants."""
    kids, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue  # the process ended between the two reads
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command after --")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_anon_kib(proc.pid))
        time.sleep(args.interval)
    print(json.dumps({"peak_rss_anon_mib": round(peak / 1024, 1), "seconds": round(time.perf_counter() - t0, 1),
                      "rc": proc.returncode}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
