"""WSD schedules: separate cooldowns vs cooldown & QAT fusion, in fractions or tokens."""

import numpy as np
import pytest

from mlx_qat.schedule import Schedule

PEAK, FP, QAT = 1e-3, 8000, 2000


def lrs(schedule, start, stop, n=2001):
    t = np.linspace(start, stop, n)
    return t, np.array([schedule(x) for x in t])


def test_separate_has_both_cooldowns_and_a_qat_rewarmup():
    s = Schedule(PEAK, FP, QAT, "separate", warmup=0.1, cooldown=0.25)
    assert s(0) == 0
    assert s(400) == pytest.approx(PEAK / 2)  # halfway through the 800-token FP warmup
    assert s(800) == PEAK and s(5999) == PEAK  # stable until the FP cooldown (last 2000 tokens)
    assert s(7000) == pytest.approx(PEAK / 2)
    assert s(FP - 1e-6) == pytest.approx(0, abs=1e-9)  # the FP phase ends decayed
    assert s(FP) == 0  # QAT re-warms from zero over 200 tokens
    assert s(FP + 100) == pytest.approx(PEAK / 2)
    assert s(FP + 200) == PEAK and s(FP + 1500) == PEAK
    assert s(FP + 1750) == pytest.approx(PEAK / 2)
    assert s(FP + QAT) == pytest.approx(0)
    t, lr = lrs(s, FP - 2000, FP)
    assert np.all(np.diff(lr) <= 1e-18)  # monotone FP cooldown


def test_fused_has_no_fp_cooldown_and_qat_carries_the_decay():
    s = Schedule(PEAK, FP, QAT, "fused", warmup=0.1, cooldown=0.25)
    t, lr = lrs(s, 800, FP - 1e-6)
    assert np.all(lr == PEAK)  # no FP cooldown at all
    assert s(FP) == PEAK  # QAT starts at the peak: no re-warmup
    assert s(FP + QAT / 2) == pytest.approx(PEAK / 2)  # linear decay across the QAT phase
    assert s(FP + QAT) == pytest.approx(0)
    t, lr = lrs(s, FP, FP + QAT)
    assert np.all(np.diff(lr) < 0)


def test_fp_only_run_keeps_its_cooldown_under_both_kinds():
    for kind in ("separate", "fused"):
        s = Schedule(PEAK, FP, 0, kind, warmup=0.1, cooldown=0.25)
        assert s(7000) == pytest.approx(PEAK / 2)
        assert s(FP) == pytest.approx(0)


def test_qat_from_scratch_warms_up():
    for kind in ("separate", "fused"):
        s = Schedule(PEAK, 0, QAT, kind, warmup=0.1, cooldown=0.25)
        assert s(0) == 0 and s(100) == pytest.approx(PEAK / 2) and s(QAT) == pytest.approx(0)


def test_final_lr_fraction():
    s = Schedule(PEAK, FP, QAT, "separate", final_lr_fraction=0.1)
    assert s(FP + QAT) == pytest.approx(0.1 * PEAK)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="cosine"), "separate, fused"),
    (dict(warmup=-0.1), "warmup=-0.1"),
    (dict(cooldown=1.5), "cooldown=1.5"),
    (dict(warmup=0.6, cooldown=0.6), "exceeds the phase"),
])
def test_invalid_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(PEAK, FP, QAT, **kwargs)


def test_token_counts_win_over_fractions():
    s = Schedule(PEAK, FP, QAT, "separate", warmup=0.1, cooldown=0.25, warmup_tokens=500, cooldown_tokens=1000)
    assert s(250) == pytest.approx(PEAK / 2) and s(500) == PEAK
    assert s(FP - 1001) == PEAK and s(FP - 500) == pytest.approx(PEAK / 2)
    assert s(FP + 250) == pytest.approx(PEAK / 2)  # the QAT re-warmup is 500 tokens too
    assert s(FP + QAT - 500) == pytest.approx(PEAK / 2)


def test_runs_with_different_fp_phases_share_their_prefix_in_tokens():
    """With warmup in tokens, two runs' FP learning rates agree up to the earlier FP cooldown."""
    kw = dict(warmup_tokens=600, cooldown=0.2)
    a, b = Schedule(PEAK, 4000, 6000, "separate", **kw), Schedule(PEAK, 9000, 1000, "separate", **kw)
    t = np.linspace(0, 4000 - 0.2 * 4000, 500)
    assert [a(x) for x in t] == [b(x) for x in t]
    fractions = Schedule(PEAK, 4000, 6000, "separate", warmup=0.05), Schedule(PEAK, 9000, 1000, "separate", warmup=0.05)
    assert fractions[0](300) != fractions[1](300)  # warmup as a fraction of D_fp differs


def test_a_warmup_longer_than_its_phase_ends_with_it():
    s = Schedule(PEAK, 1000, 1000, "separate", warmup_tokens=4000, cooldown_tokens=100)
    assert s(500) == pytest.approx(PEAK * 500 / 4000)
    assert s(999) == pytest.approx(PEAK * 999 / 4000)  # no room left for a cooldown
