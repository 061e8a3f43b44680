"""The bench's steady-state rule for Neo4j's JIT warm-up (bench/run.py)."""

from __future__ import annotations

from bench.run import JIT_SETTLED_SHARE, JIT_SETTLED_WINDOWS, _jit_settled


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
