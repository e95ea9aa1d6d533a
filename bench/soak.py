"""The ten-minute soak: `python bench/soak.py [--minutes 10] [--out FILE]`.

Runs tests/soak.py's mixed load (warm manifests and blobs, HEADs, Range reads, cold fills,
mid-stream disconnects) against a real mirror process, then writes the report as JSON
(bench/results/soak-<date>.json by default) and prints a summary: requests, errors, and the
mirror's descriptors, tasks and RSS at the start and end. Exit status 1 if any 5xx, wrong
byte, client error or leak was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from soak import Report, soak  # noqa: E402


def summary(report: Report) -> str:
    start, end = report.start, report.end
    assert start is not None and end is not None
    rate = report.total() / report.seconds if report.seconds else 0
    lines = [
        f"soak: {report.seconds:.0f} s, {report.total():,} requests ({rate:,.0f}/s), "
        f"{report.bytes_read / 2**30:.1f} GiB read",
        "requests: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report.requests.items())),
        "statuses: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report.statuses.items())),
        f"5xx: {report.server_errors}, wrong bytes: {report.wrong_bytes}, client errors: {len(report.client_errors)}",
        f"fills: {report.fills}, blobs evicted: {report.evicted:,.0f}",
        f"descriptors: {start.fds} -> {end.fds} (on blob or partial files: {start.blob_files} -> "
        f"{end.blob_files}); "
        f"tasks: {start.tasks} -> {end.tasks}",
        f"RSS: {start.rss_kib / 1024:.1f} MiB -> {end.rss_kib / 1024:.1f} MiB "
        f"(peak {report.peak_rss_kib / 1024:.1f} MiB)",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="default: a temporary directory"
    )
    args = parser.parse_args()
    out = args.out or BENCH / "results" / f"soak-{time.strftime('%Y-%m-%d_%H%M%S')}.json"
    report = asyncio.run(soak(args.minutes * 60, args.data_dir, sample_every=10.0))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.as_dict(), indent=1))
    print(summary(report))
    print(f"report: {out}")
    assert report.start is not None and report.end is not None
    leaked = report.end.blob_files > 0 or report.end.tasks > report.start.tasks
    return 1 if report.server_errors or report.wrong_bytes or report.client_errors or leaked else 0


if __name__ == "__main__":
    raise SystemExit(main())
