"""Load test, reduced (benchmarks/load_test.py at 400 samples / 20 shards): flat memory, no fd leak.

The full run (10,000 samples into 52 shards) is ``python benchmarks/load_test.py``; this one
runs the same code on a 25th of the work and asserts what docs/reliability.md reports: the set
verifies, RSS of the driver and of every actor / loader worker stays flat from 25 % to
100 % of the work, and no file descriptor is leaked per shard (counts do not grow).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from load_test import format_report, growth, run_load_test  # noqa: E402

FLAT_MB = 25.0  # allowed RSS growth from 25 % to 100 % (measured: a few MB)


@pytest.mark.slow
def test_reduced_load_memory_is_flat_and_no_fd_leaks(tmp_path: Path) -> None:
    res = run_load_test(tmp_path, sources=25, samples_per_source=4, samples_per_shard=20, size=16, actors=2,
                        batch_size=64, workers=2)
    print("\n" + format_report(res))
    gen, seg = res["generate"], res["seg"]
    assert gen["verify"]["ok"], gen["verify"]["problems"]
    assert (gen["samples"], gen["shards"]) == (400, 20) == (gen["verify"]["samples"], gen["verify"]["shards"])
    assert set(gen["memory"]["at_percent"]) == {"25", "50", "75", "100"}

    # Flat memory: driver and every actor present at both marks.
    assert all(v <= FLAT_MB for v in growth(gen["memory"]).values()), growth(gen["memory"])
    assert growth(seg["memory"])["driver"] <= FLAT_MB
    assert all(v < 2048 for v in gen["memory"]["peak_rss_mb"].values())

    # No fd leak: 20 shards written, then all read again by seg; counts move by Ray's sockets only.
    assert gen["driver_fds_after"] - gen["driver_fds_before"] <= 4
    first, last = gen["memory"]["at_percent"]["25"]["fds"], gen["memory"]["at_percent"]["100"]["fds"]
    for pid in set(first) & set(last):
        assert last[pid] - first[pid] <= 2, (pid, first[pid], last[pid])
    assert seg["driver_fds_after"] - seg["driver_fds_before"] <= 2

    # The seg epoch streamed the synthetic shards at every λ.
    assert seg["samples_seen"] >= gen["samples"]
    assert set(seg["lam_counts"]) == {"0.25", "0.5", "0.75", "1.0"} and not math.isnan(seg["miou"])
