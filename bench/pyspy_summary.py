"""Summarise py-spy raw samples written by `bench/throughput.py --py-spy DIR`.

    .venv/bin/python bench/pyspy_summary.py DIR/large-none-...-target.txt [--top 25]

The samples cover wall-clock time of every thread (idle ones too, recorded with --idle), so a
frame's share is the share of that thread's wall time spent inside it. Printed per thread:
its share of all samples, the frames of the project (agents/, migrator/) by inclusive share, and
the leaf frames (where the thread actually was: a syscall wrapper, a lock wait, hashing...).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"^thread \((?P<tid>\d+)\): (?P<stack>.*) (?P<n>\d+)$")
PROJECT_FRAME = re.compile(r"\((?:agents|migrator)/")


def frame_name(frame: str) -> str:
    """`func (file.py:123)` without the line number, so one function is one row."""
    return re.sub(r":\d+\)$", ")", frame)


def summarise(path: Path, top: int, lines: bool = False) -> str:
    threads: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    leaves: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        if not m:
            continue
        frames = m["stack"].split(";")
        thread = re.sub(r"_\d+$", "_N", frames[0])  # executor threads taken together
        n = int(m["n"])
        threads[thread] += n
        for name in {frame_name(f) for f in frames[1:]}:
            inclusive[thread][name] += n
        leaves[thread][frames[-1] if lines else frame_name(frames[-1])] += n
    total = sum(threads.values()) or 1
    out = [f"== {path.name}: {total} samples"]
    for thread, n in threads.most_common():
        out.append(f"-- thread {thread}: {n} samples ({100 * n / total:.0f}% of all)")
        own = [(k, v) for k, v in inclusive[thread].most_common() if PROJECT_FRAME.search(k)]
        out.append("   project frames, inclusive:")
        out += [f"     {100 * v / n:5.1f}%  {k}" for k, v in own[:top]]
        out.append("   leaf frames:")
        out += [f"     {100 * v / n:5.1f}%  {k}" for k, v in leaves[thread].most_common(top)]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--lines", action="store_true", help="leaf frames with their line numbers")
    args = p.parse_args()
    for f in args.files:
        print(summarise(f, args.top, args.lines))


if __name__ == "__main__":
    main()
