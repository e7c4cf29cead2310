"""The KV cache of the requests in flight moves the policy's projected memory (pure functions, a table)."""

from langchain_adaptquant import TaskPriority
from langchain_adaptquant.control.levels import LEVELS_BY_PRECISION
from langchain_adaptquant.control.policy import PolicyConfig, PolicyInputs, apply_hysteresis, decide, HysteresisState
from langchain_adaptquant.units import GIB

FP16, INT8, INT4, INT2 = LEVELS_BY_PRECISION
SIZES = {FP16: 2 * GIB, INT8: GIB, INT4: GIB // 2, INT2: GIB // 4}


def inputs(used_gb: float, resident_gb: float = 0.0, reserved_gb: float = 0.0) -> PolicyInputs:
    return PolicyInputs(total_bytes=16 * GIB, used_bytes=int(used_gb * GIB), active_requests=1,
                        priority=TaskPriority.QUALITY, level_bytes=SIZES, current_level=FP16,
                        current_bytes=SIZES[FP16], kv_resident_bytes=int(resident_gb * GIB),
                        kv_reserved_bytes=int(reserved_gb * GIB))


def test_reserved_kv_bytes_are_added_and_resident_ones_not_counted_twice():
    plain = inputs(4.0)
    assert inputs(4.0, reserved_gb=1.0).projected_used_bytes(INT4) == plain.projected_used_bytes(INT4) + GIB
    # 1 GiB of cache already inside `used`, growing to 1.5 GiB: only the growth is added
    assert inputs(4.0, resident_gb=1.0, reserved_gb=1.5).projected_used_bytes(INT4) == plain.projected_used_bytes(INT4) + GIB // 2


def test_kv_bytes_can_turn_fp16_into_a_downgrade_forced_by_memory():
    assert decide(inputs(4.0)).level is FP16  # 25% projected: relaxed
    heavy = decide(inputs(4.0, reserved_gb=7.0))  # the same machine, with 7 GiB of KV cache coming
    assert heavy.level is INT4 and "KV cache 7168.0 MB" in heavy.reason
    verdict = apply_hysteresis(heavy, HysteresisState(level=FP16), now=100.0, config=PolicyConfig())
    assert verdict.switch and "memory pressure" in verdict.reason  # at once, not after the load delay


def test_kv_bytes_count_in_the_fit_check():
    import pytest

    from langchain_adaptquant import InsufficientMemoryError

    # 14 of 16 GiB used with the model at FP16 (2 GiB): 12 GiB are someone else's
    assert decide(inputs(14.0)).level is INT4  # 12.5 GiB at INT4: critical band
    assert decide(inputs(14.0, reserved_gb=2.0)).level is INT2  # the cache pushes it into emergency
    with pytest.raises(InsufficientMemoryError):  # 12.25 + 3.5 GiB leaves less than the 0.8 GiB headroom
        decide(inputs(14.0, reserved_gb=3.5))
