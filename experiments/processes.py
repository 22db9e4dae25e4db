"""Process trees from /proc (Linux): what the tests that start Flower and Ray check is stopped,
and what bench/scale.py sums the memory of. Ray and Flower detach some of their processes into
sessions of their own, so a process group is not enough: the tree is followed by parent pid.
A process is identified by (pid, start time), so that a reused pid is not taken for it."""

from __future__ import annotations

import os
from pathlib import Path


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time in clock ticks) of every live process; zombies left out."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                table[int(entry)] = (int(fields[1]), fields[19])
    return table


def descendants(pid: int, table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    """Every live process below ``pid`` (not ``pid`` itself)."""
    table = process_table() if table is None else table
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def identified_descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live process below ``pid``."""
    table = process_table()
    return {(p, table[p][1]) for p in descendants(pid, table)}


def alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those of ``processes`` ((pid, start time) pairs) still running."""
    table = process_table()
    return {(pid, start) for pid, start in processes if pid in table and table[pid][1] == start}


def send(pid: int, sig: int, group: bool = False) -> None:
    """Signal a process (or its process group) that may have ended since it was listed: a gone one is no error."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pss_bytes(pid: int) -> int:
    """Proportional set size: the process's private pages plus its share of the pages it shares."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
