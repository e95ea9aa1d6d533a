#!/usr/bin/env python3
"""Warm blob streams, measured apart: GB/s of one client and of four clients at once reading
the big blob from the mirror's disk cache, each measurement paired with the same one against
nginx static right before it (run.py's warm phase, without the rest of the run).

It starts a `mirror serve` of this checkout (one process, like hitpath.py) against the
benchmark's upstream (`bench/upstream.sh start && bench/upstream.sh populate`;
`bench/peers.sh start static` for the reference), fills the blob once, and then takes
`--rounds` rounds of: nginx 1 client, mirror 1 client, nginx 4 clients, mirror 4 clients. The
clients are run.py's: headers read, the body spliced socket -> pipe -> /dev/null. Reported:
medians of GB/s (GB = 1e9 B), of the per-pair ratios, and the mirror's CPU seconds per GB
served. `--baseline DIR` measures another checkout in the same rounds.

    python3 bench/stream.py                     # 5 rounds
    python3 bench/stream.py --rounds 9 --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hitpath
import run


def cpu_s(pid: int) -> float:
    return sum(hitpath.thread_cpu(pid).values())


def single(url: str, path: str, size: int) -> float:
    r = run.http_get(url, path)
    if r["status"] != 200 or r["bytes"] != size:
        sys.exit(f"{url}{path}: {r['status']}, {r['bytes']} of {size} bytes")
    return r["bytes"] / r["total"] / 1e9


def together(url: str, path: str, size: int, n: int) -> float:
    res, wall, ok = run.concurrent_gets(url, path, n, size)
    if ok != n:
        sys.exit(f"{url}{path}: {n - ok} of {n} clients failed: {res}")
    return sum(r["bytes"] for r in res) / wall / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--upstream", default="http://127.0.0.1:5101")
    ap.add_argument("--meta", default=run.DEFAULT_META)
    ap.add_argument("--ref", default="http://127.0.0.1:5104")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--baseline", help="another checkout, measured in the same rounds")
    ap.add_argument("--env", action="append", default=[], help="K=V for the mirror process")
    ap.add_argument("--python", default=str(hitpath.PROJECT / ".venv/bin/python"))
    ap.add_argument("--out", help="write the JSON results here")
    a = ap.parse_args()
    python = hitpath.PYTHON = a.python if Path(a.python).exists() else sys.executable

    blob = json.load(open(a.meta))["big_blob"]
    path, size = blob["path"], blob["size"]
    work = Path(tempfile.mkdtemp(prefix="stream-"))
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in a.env)
    mirrors = {
        "mirror": hitpath.start_mirror(
            "mirror", hitpath.PROJECT, python, a.upstream, env, work, None
        )
    }
    if a.baseline:
        mirrors["baseline"] = hitpath.start_mirror(
            "baseline", Path(a.baseline), python, a.upstream, env, work, None
        )
    rows: dict[str, list[float]] = {}
    try:
        for m in mirrors.values():
            m.wait()
            single(m.url, path, size)  # the fill
            single(m.url, path, size)  # warm from here on
        single(a.ref, path, size)
        n = a.clients
        for i in range(a.rounds):
            line = []
            for name, m in list(mirrors.items())[:: 1 if i % 2 == 0 else -1]:
                for kind, measure in (
                    ("1 client", lambda u: single(u, path, size)),
                    (f"{n} clients", lambda u: together(u, path, size, n)),
                ):
                    ref = measure(a.ref)
                    before = cpu_s(m.pid)
                    got = measure(m.url)
                    served = size * (1 if kind == "1 client" else n) / 1e9
                    rows.setdefault(f"nginx static {kind}", []).append(ref)
                    rows.setdefault(f"{name} {kind}", []).append(got)
                    rows.setdefault(f"{name} {kind} ratio", []).append(got / ref)
                    rows.setdefault(f"{name} {kind} cpu", []).append(
                        (cpu_s(m.pid) - before) / served
                    )
                    line.append(f"{name} {kind} {got:.2f} (ref {ref:.2f})")
            hitpath.log(f"round {i + 1}: " + "  ".join(line))
    finally:
        for m in mirrors.values():
            m.stop()
    med = hitpath.med
    print(f"| median of {a.rounds} rounds | GB/s | × nginx static (paired) | server CPU s/GB |")
    print("|---|---|---|---|")
    for kind in ("1 client", f"{a.clients} clients"):
        print(f"| nginx static, {kind} | {med(rows[f'nginx static {kind}']):.2f} | | |")
        for name in mirrors:
            print(
                f"| {name}, {kind} | {med(rows[f'{name} {kind}']):.2f} "
                f"| {med(rows[f'{name} {kind} ratio']):.2f} | {med(rows[f'{name} {kind} cpu']):.3f} |"
            )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    hitpath.log(f"logs in {work}")


if __name__ == "__main__":
    main()
