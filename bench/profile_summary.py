"""Where a replica's threads spent their time, from a `py-spy record --format raw` file (collapsed stacks).

    python -m bench.profile_summary bench/results/profile_served_c64/pyspy_S3GenStage.txt.gz --top 8

Per thread: its samples, the leaf frames (file:line) that took the most, and the functions most often on the
stack (inclusive). Shares are of the thread's samples (py-spy --idle: waiting counts too).
"""
from __future__ import annotations

import argparse
import gzip
from collections import Counter, defaultdict


def summarize(lines, top: int) -> str:
    threads: Counter = Counter()
    leaves: defaultdict = defaultdict(Counter)
    inclusive: defaultdict = defaultdict(Counter)
    for line in lines:
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread, count = frames[0], int(n)
        threads[thread] += count
        leaves[thread][frames[-1]] += count
        for name in {f.split(" (")[0] for f in frames[1:]}:
            inclusive[thread][name] += count
    out = []
    for thread, total in threads.most_common():
        out.append(f"{thread}: {total} samples")
        out += [f"  leaf {100 * c / total:5.1f}%  {k}" for k, c in leaves[thread].most_common(top)]
        out += [f"  incl {100 * c / total:5.1f}%  {k}" for k, c in inclusive[thread].most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", help="py-spy raw output (.txt or .txt.gz)")
    p.add_argument("--top", type=int, default=10)
    a = p.parse_args(argv)
    opener = gzip.open if a.file.endswith(".gz") else open
    with opener(a.file, "rt") as f:
        print(summarize(f, a.top))


if __name__ == "__main__":
    main()
