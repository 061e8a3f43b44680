"""A short run of the soak test (``bench/soak.py``; ``make soak`` runs the full five minutes).

A real ``gmtrouter serve`` process on a SQLite file takes ~25 s of mixed Select /
RecordResponse / duplicate retries / provoked invalid requests / StreamPreferences
subscribers over loopback; every criterion of the full run must hold.
"""

from __future__ import annotations

from pathlib import Path

from bench.soak import SoakConfig, soak


def test_short_soak_on_sqlite(tmp_path: Path) -> None:
    result = soak(
        SoakConfig(
            duration_s=25.0,
            store="sqlite",
            clients=8,
            subscribers=3,
            sample_s=1.0,
            workdir=tmp_path,
        )
    )
    req = result["requests"]
    assert result["criteria"] == dict.fromkeys(result["criteria"], True), (
        result["criteria"],
        req["error_examples"],
        result["writes"],
        result["memory"],
    )
    assert result["ok"]
    for kind in ("select", "record", "record_retry", "stream"):
        assert req["ok_by_kind"].get(kind, 0) > 0, req
    assert req["errors_by_code"] == {}
    assert sum(req["provoked_by_code"].values()) > 0
    assert set(req["provoked_by_code"]) <= {
        "Select:INVALID_ARGUMENT",
        "RecordResponse:INVALID_ARGUMENT",
        "StreamPreferences:INVALID_ARGUMENT",
    }
    w = result["writes"]
    assert w["acked_new"] == w["stored_new"] > 0
    assert w["stored_ids_match_acked"] is True
    assert w["retries_answered_duplicate"] > 0
    assert result["streams"]["updates_read"] >= result["streams"]["opened"]
