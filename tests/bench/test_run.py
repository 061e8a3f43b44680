"""The bench's steady-state rules (bench/run.py): Neo4j's JIT warm-up, the record windows,
the host-speed calibration."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.run import (
    JIT_SETTLED_SHARE,
    JIT_SETTLED_WINDOWS,
    _jit_settled,
    calibrated,
    calibration_summary,
    class_cpu_s,
    host_calibration_ms,
    io_per_call,
    median_window,
    pid_io,
    record_rounds,
    thread_cpu_ms_per_call,
    thread_cpu_s,
    thread_runq_wait_s,
)


def _curve(*shares: float) -> list[dict[str, float]]:
    return [{"rps": 500.0, "jit_cpu_share": s} for s in shares]


def test_settled_needs_consecutive_quiet_windows() -> None:
    quiet, busy = JIT_SETTLED_SHARE / 2, JIT_SETTLED_SHARE * 3
    assert JIT_SETTLED_WINDOWS >= 2
    assert not _jit_settled(_curve())
    # one quiet window after busy ones is not enough: the compiler comes back
    assert not _jit_settled(_curve(busy, busy, quiet))
    assert not _jit_settled(_curve(*[quiet] * (JIT_SETTLED_WINDOWS - 1)))
    assert not _jit_settled(_curve(*[quiet] * JIT_SETTLED_WINDOWS, busy))
    assert _jit_settled(_curve(busy, busy, *[quiet] * JIT_SETTLED_WINDOWS))
    # the bound is strict
    assert not _jit_settled(_curve(*[JIT_SETTLED_SHARE] * JIT_SETTLED_WINDOWS))


def test_median_window_is_a_measured_window() -> None:
    assert median_window([]) is None
    windows = [{"rps": 900.0, "k": 0}, {"rps": 1200.0, "k": 1}, {"rps": 1000.0, "k": 2}]
    m = median_window(windows)
    assert m is not None and m["k"] == 2 and m["rps"] == 1000.0
    assert m["rps_windows"] == [900.0, 1200.0, 1000.0]
    # the caller's windows are left as they were
    assert all("rps_windows" not in w for w in windows)
    # an even count takes the lower middle window, never an average nobody measured
    m = median_window([*windows, {"rps": 1100.0, "k": 3}])
    assert m is not None and m["k"] == 2


def test_record_rounds_alternate_and_survive_a_failing_go_client() -> None:
    order: list[tuple[str, int]] = []

    def window(client: str) -> Callable[[int], dict[str, Any]]:
        def run(k: int) -> dict[str, Any]:
            order.append((client, k))
            return {"rps": float(len(order))}

        return run

    py, go, failed = record_rounds(window("py"), window("go"), 3)
    assert order == [("go", 0), ("py", 0), ("py", 1), ("go", 1), ("go", 2), ("py", 2)]
    assert [w["rps"] for w in py] == [2.0, 3.0, 6.0] and [w["rps"] for w in go] == [1.0, 4.0, 5.0]
    assert failed is None

    calls = 0

    def go_fails_second(k: int) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("loadgen exited 1")
        return {"rps": 1.0}

    py, go, failed = record_rounds(lambda k: {"rps": 2.0}, go_fails_second, 3)
    assert len(py) == 3 and len(go) == 1 and calls == 2
    assert failed is not None and "loadgen exited 1" in failed
    py, go, failed = record_rounds(lambda k: {"rps": 2.0}, None, 2)
    assert len(py) == 2 and go == [] and failed is None


def test_host_calibration_is_the_median_thread_cpu_time_in_ms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # three runs of the loop reading 10, 40 and 20 ms of thread CPU time: the median, in ms
    # (a wall clock, seconds or the mean, 23.3, would give another answer)
    ticks = iter([0.0, 0.010, 1.0, 1.040, 2.0, 2.020])
    monkeypatch.setattr(time, "thread_time", lambda: next(ticks))
    assert host_calibration_ms(loop=10, reps=3) == 20.0


def test_host_calibration_follows_the_amount_of_work() -> None:
    small = host_calibration_ms(loop=50_000, reps=5)
    large = host_calibration_ms(loop=400_000, reps=5)
    # 8 times the work (a host that slows by a third between the two readings still passes)
    assert small > 0 and large > 3 * small


def test_calibrated_windows_carry_their_reading() -> None:
    readings: list[float] = [1.0]
    out = calibrated(lambda: {"rps": 900.0}, readings)
    assert out["rps"] == 900.0 and out["host_calibration_ms"] > 0
    assert readings == [1.0, out["host_calibration_ms"]]

    def failing() -> dict[str, Any]:
        raise RuntimeError("the load generator failed")

    with pytest.raises(RuntimeError):
        calibrated(failing, readings)
    assert len(readings) == 2  # a window that did not run adds no reading


def test_calibration_summary_keeps_every_reading() -> None:
    assert calibration_summary([]) == {}
    assert calibration_summary([30.0, 26.0, 40.0, 27.0]) == {
        "min": 26.0,
        "median": 28.5,
        "max": 40.0,
        "all": [30.0, 26.0, 40.0, 27.0],
    }


def _spin(seconds: float) -> None:
    """Burn ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_thread_cpu_is_split_by_thread_name() -> None:
    ready, done = threading.Event(), threading.Event()

    def worker() -> None:
        # a thread may rename itself (Linux: its own /proc task's comm); Neo4j's threads are
        # told apart the same way
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text("bench-spin")
        _spin(0.3)
        ready.set()
        done.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert ready.wait(10), "the worker thread could not rename itself"
        classes = [("bench-spin", "spin")]
        before = thread_cpu_s(os.getpid(), classes)
        _spin(0.2)
        after = thread_cpu_s(os.getpid(), classes)
        # a name match wins over the main thread's class; without a main class (a JVM's
        # first thread) the main thread is "other"
        as_spin = thread_cpu_s(os.getpid(), [("", "spin")])
        no_main = thread_cpu_s(os.getpid(), classes, main_class=None)
    finally:
        done.set()
        t.join()
    # the named thread's 0.3 s are under its class, not the main thread's (clock ticks: 10 ms)
    spin = [cpu for cls, cpu in before.values() if cls == "spin"]
    assert len(spin) == 1 and 0.28 <= spin[0] < 0.5
    delta = class_cpu_s(before, after)
    assert delta["spin"] < 0.05
    assert 0.18 <= delta["main"] < 0.4
    assert {cls for cls, _ in as_spin.values()} == {"spin"}
    assert "main" not in {cls for cls, _ in no_main.values()}
    assert no_main[str(os.getpid())][0] == "other"
    assert thread_cpu_s(None) == {}


def test_class_cpu_counts_thread_by_thread() -> None:
    before = {"1": ("main", 1.0), "2": ("jit", 5.0), "3": ("jit", 2.0)}
    # thread 3 exited with 5 s in all (its last 3 s unseen), thread 4 started: a class total
    # would have read jit 7.0 -> 5.25, i.e. -1.75 s
    after = {"1": ("main", 1.5), "2": ("jit", 5.0), "4": ("jit", 0.25)}
    assert class_cpu_s(before, after) == {"jit": 0.25, "main": 0.5}
    # ms per call; what the live threads miss of the process's total shows as "exited"
    assert thread_cpu_ms_per_call(before, after, calls=500) == {"jit": 0.5, "main": 1.0}
    assert thread_cpu_ms_per_call(before, after, calls=500, process_s=3.75) == {
        "exited": 6.0,
        "jit": 0.5,
        "main": 1.0,
    }
    # a gap within the clock ticks of the threads that ran is rounding, not an exited thread
    assert "exited" not in thread_cpu_ms_per_call(before, after, calls=500, process_s=0.77)
    assert thread_cpu_ms_per_call(before, after, calls=0) == {"jit": 250.0, "main": 500.0}


def test_io_per_call_reads_this_process_counters(tmp_path: Path) -> None:
    """The counters come from /proc/<pid>/io and follow real writes and reads; a gone or
    unknown process gives no reading and no figures."""
    before = pid_io(os.getpid())
    assert {"rchar", "wchar", "syscr", "syscw"} <= set(before)
    path = tmp_path / "blob"
    with path.open("wb", buffering=0) as f:
        for _ in range(8):
            f.write(b"x" * 64 * 1024)
    with path.open("rb", buffering=0) as f:
        while f.read(32 * 1024):
            pass
    after = pid_io(os.getpid())
    per = io_per_call(before, after, calls=2)
    # 512 KiB written in 8 calls and read back in at least 16, per call of 2
    assert per["write_kb"] >= 256
    assert per["write_calls"] >= 4
    assert per["read_kb"] >= 256
    assert per["read_calls"] >= 8
    assert pid_io(None) == {}
    assert pid_io(2**22 + 12345) == {}  # above Linux's pid_max: no such process
    assert io_per_call({}, after, 10) == {}
    assert io_per_call(before, {}, 10) == {}


def test_io_per_call_arithmetic() -> None:
    before = {"rchar": 0, "wchar": 1024, "syscr": 3, "syscw": 1}
    after = {"rchar": 10 * 1024, "wchar": 1024 + 20 * 1024, "syscr": 13, "syscw": 6}
    assert io_per_call(before, after, 5) == {
        "read_kb": 2.0,
        "write_kb": 4.0,
        "read_calls": 2.0,
        "write_calls": 1.0,
    }
    # no calls counts as one, never a division by zero
    assert io_per_call(before, after, 0)["write_kb"] == 20.0


def _hash_for(seconds: float, name: str, cpu: int, started: threading.Barrier) -> None:
    """Rename this thread, pin it to core ``cpu`` and hash for ``seconds`` of wall time:
    hashlib releases the GIL on large inputs, so two such threads are both ready to run."""
    Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name)
    os.sched_setaffinity(0, {cpu})  # 0: this thread
    block = b"x" * (1 << 20)
    started.wait(10)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        hashlib.sha256(block).digest()


def _hashing(threads: int, cpu: int) -> tuple[dict[str, float], dict[str, float]]:
    """CPU and run-queue wait by class over 0.4 s while ``threads`` hashing threads share core
    ``cpu``."""
    classes = [("bench-hash", "hash")]
    started = threading.Barrier(threads + 1)
    workers = [
        threading.Thread(target=_hash_for, args=(0.6, f"bench-hash-{i}", cpu, started))
        for i in range(threads)
    ]
    for t in workers:
        t.start()
    started.wait(10)
    before_wait = thread_runq_wait_s(os.getpid(), classes)
    before_cpu = thread_cpu_s(os.getpid(), classes)
    time.sleep(0.4)
    after_wait = thread_runq_wait_s(os.getpid(), classes)
    after_cpu = thread_cpu_s(os.getpid(), classes)
    for t in workers:
        t.join()
    return class_cpu_s(before_cpu, after_cpu), class_cpu_s(before_wait, after_wait)


def test_runq_wait_is_time_ready_but_not_running() -> None:
    """A thread alone on a core runs and hardly waits; two threads ready to run on one core
    take turns, each waiting on the run queue about as long as the other runs. The wait
    lands in the threads' class; the main thread, asleep, neither ran nor waited."""
    if not Path(f"/proc/self/task/{threading.get_native_id()}/schedstat").exists():
        pytest.skip("this kernel keeps no scheduler statistics (schedstat)")
    cpu = min(os.sched_getaffinity(0))
    ran, waited = _hashing(1, cpu)
    assert ran["hash"] >= 0.25
    assert waited["hash"] < 0.5 * ran["hash"]  # reading the run time instead would fail here
    ran, waited = _hashing(2, cpu)
    # 0.4 s of one core: ~0.4 s of CPU and ~0.4 s of waiting between the two threads
    assert 0.25 <= ran["hash"] <= 0.5
    assert waited["hash"] >= 0.5 * ran["hash"]
    assert waited.get("main", 0.0) < 0.05
    assert thread_runq_wait_s(None) == {}
    assert thread_runq_wait_s(2**22 + 12345) == {}
