"""A short run of the mixed soak (tests/soak.py) against a real mirror process: no 5xx, no
wrong byte, no client error, and nothing left held once the load stops. The ten-minute run
is `bench/soak.py`; its numbers are in the README."""

from __future__ import annotations

from pathlib import Path

from soak import soak


async def test_mixed_soak_serves_everything_and_leaks_nothing(tmp_path: Path) -> None:
    report = await soak(15, tmp_path / "data", sample_every=5)
    assert report.total() > 1000 and all(
        report.requests[a] > 0
        for a in ("manifest_tag", "warm_blob", "range", "cold_fill", "disconnect")
    )
    assert report.server_errors == 0, report.statuses
    assert report.wrong_bytes == 0
    assert report.client_errors == []
    assert report.start is not None and report.end is not None
    assert report.end.blob_files == 0, "no blob or partial file left open"
    assert report.end.tasks <= report.start.tasks, "no task left behind"
    # the rest: idle upstream keep-alive connections still pooled, and SQLite connections of
    # store threads first used under load (one per thread, bounded by the pool)
    assert report.end.fds <= report.start.fds + 16
