"""WSD schedules: separate cooldowns vs cooldown & QAT fusion, in fractions or tokens; every phase whole."""

import numpy as np
import pytest

from mlx_qat import config
from mlx_qat.schedule import Schedule, ScheduleError, Shape, make_schedule, plan_run

PEAK, FP, QAT = 1e-3, 8000, 2000


def lrs(schedule, start, stop, n=2001):
    t = np.linspace(start, stop, n)
    return t, np.array([schedule(x) for x in t])


def test_separate_has_both_cooldowns_and_a_qat_rewarmup():
    s = Schedule(PEAK, FP, QAT, "separate", Shape(0.1, 0.25), Shape(0.1, 0.25))
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
    s = Schedule(PEAK, FP, QAT, "fused", Shape(0.1, 0.25), Shape(0.1, 0.25))
    t, lr = lrs(s, 800, FP - 1e-6)
    assert np.all(lr == PEAK)  # no FP cooldown at all
    assert s(FP) == PEAK  # QAT starts at the peak: no re-warmup
    assert s(FP + QAT / 2) == pytest.approx(PEAK / 2)  # linear decay across the QAT phase
    assert s(FP + QAT) == pytest.approx(0)
    t, lr = lrs(s, FP, FP + QAT)
    assert np.all(np.diff(lr) < 0)


def test_fp_only_run_keeps_its_cooldown_under_both_kinds():
    for kind in ("separate", "fused"):
        s = Schedule(PEAK, FP, 0, kind, Shape(0.1, 0.25))
        assert s(7000) == pytest.approx(PEAK / 2)
        assert s(FP) == pytest.approx(0)


def test_qat_from_scratch_warms_up():
    for kind in ("separate", "fused"):
        s = Schedule(PEAK, 0, QAT, kind, qat=Shape(0.1, 0.25))
        assert s(0) == 0 and s(100) == pytest.approx(PEAK / 2) and s(QAT) == pytest.approx(0)


def test_final_lr_fraction():
    s = Schedule(PEAK, FP, QAT, "separate", final_lr_fraction=0.1)
    assert s(FP + QAT) == pytest.approx(0.1 * PEAK)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="cosine"), "separate, fused"),
    (dict(fp=Shape(warmup=-0.1)), "warmup=-0.1"),
    (dict(qat=Shape(cooldown=1.5)), "qat_cooldown=1.5"),
    (dict(fp=Shape(0.6, 0.6)), "FP phase"),
])
def test_invalid_schedules(kwargs, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule(PEAK, FP, QAT, **kwargs)


def test_fp_token_counts_win_over_fractions_and_leave_the_qat_phase_alone():
    s = Schedule(PEAK, FP, QAT, "separate", Shape(0.1, 0.25, warmup_tokens=500, cooldown_tokens=1000), Shape(0.1, 0.25))
    assert s(250) == pytest.approx(PEAK / 2) and s(500) == PEAK
    assert s(FP - 1001) == PEAK and s(FP - 500) == pytest.approx(PEAK / 2)
    assert s(FP + 100) == pytest.approx(PEAK / 2)  # the QAT re-warmup is 10% of its own phase, not 500 tokens
    assert s(FP + QAT - 250) == pytest.approx(PEAK / 2)  # and its cooldown 25% of it


def test_qat_token_counts_win_over_qat_fractions():
    s = Schedule(PEAK, FP, QAT, "separate", qat=Shape(0.1, 0.25, warmup_tokens=40, cooldown_tokens=1000))
    assert s(FP + 20) == pytest.approx(PEAK / 2) and s(FP + 999) == PEAK
    assert s(FP + QAT - 500) == pytest.approx(PEAK / 2)


def test_runs_with_different_fp_phases_share_their_prefix_in_tokens():
    """With warmup in tokens, two runs' FP learning rates agree up to the earlier FP cooldown."""
    fp = Shape(warmup_tokens=600, cooldown=0.2)
    a, b = Schedule(PEAK, 4000, 6000, "separate", fp), Schedule(PEAK, 9000, 1000, "separate", fp)
    t = np.linspace(0, 4000 - 0.2 * 4000, 500)
    assert [a(x) for x in t] == [b(x) for x in t]
    fractions = Schedule(PEAK, 4000, 6000, "separate"), Schedule(PEAK, 9000, 1000, "separate")
    assert fractions[0](300) != fractions[1](300)  # warmup as a fraction of D_fp differs


@pytest.mark.parametrize("fp, qat, message", [
    (Shape(warmup_tokens=4000, cooldown_tokens=100), Shape(), "FP phase \\(1,000 tokens\\) is too short"),
    (Shape(warmup_tokens=900, cooldown=0.2), Shape(), "warmup 900 \\+ cooldown 200"),
    (Shape(), Shape(warmup_tokens=600, cooldown_tokens=600), "QAT phase \\(1,000 tokens\\) is too short"),
])
def test_a_phase_too_short_for_its_warmup_and_cooldown_is_refused(fp, qat, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule(PEAK, 1000, 1000, "separate", fp, qat)


def test_a_fused_fp_phase_needs_room_for_its_warmup_only():
    s = Schedule(PEAK, 1000, 1000, "fused", Shape(warmup_tokens=1000, cooldown=0.5))
    assert s(500) == pytest.approx(PEAK / 2) and s(1000) == PEAK and s(2000) == 0


def test_a_run_whose_phase_cannot_be_whole_is_refused_before_any_data(tmp_path):
    with pytest.raises(ValueError, match="the FP phase .* too short .* qat_fraction lower"):
        config.resolve(dict(data=str(tmp_path / "absent"), total_tokens=100 * 1024, batch_size=8, seq_len=128,
                            qat_fraction=0.9, warmup_tokens=20_480))


def test_a_saved_config_is_read_as_it_was():
    """A checkpoint of a run the schedule now refuses can still be read (to export it)."""
    saved = dict(total_tokens=100 * 1024, batch_size=8, seq_len=128, qat_fraction=0.9, warmup_tokens=20_480)
    assert config.TrainConfig(**saved).warmup_tokens == 20_480


def test_fractions_that_sum_to_one_are_whole_at_every_length():
    for length in (13_312, 1000, 7, 123_457):
        Schedule(PEAK, length, length, "separate", Shape(0.1, 0.9), Shape(0.3, 0.7))
    with pytest.raises(ScheduleError, match="at least one step"):
        Schedule(PEAK, 0, 0)


# The grid below is the shape of a sweep: 1,024 tokens a step, an FP warmup of 10 steps shared by every run.
STEP, WARMUP_TOKENS = 1024, 10 * 1024
GRID = [(total, f, kind) for total in (409_600, 1_228_800, 2_457_600)
        for f in (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9) for kind in ("separate", "fused")]


def step_rates(total, f, kind):
    cfg = config.TrainConfig(total_tokens=total, batch_size=8, seq_len=128, qat_fraction=f, schedule=kind,
                             warmup_tokens=WARMUP_TOKENS, learning_rate=PEAK)
    plan = plan_run(cfg, 1)
    schedule = make_schedule(cfg, plan)
    return plan, schedule, np.array([schedule.at_step(k, STEP) for k in range(plan.total_steps)])


@pytest.mark.parametrize("total, f, kind", GRID)
def test_every_qat_phase_reaches_its_peak_and_decays_to_the_end(total, f, kind):
    plan, schedule, lr = step_rates(total, f, kind)
    qat = lr[plan.fp_steps:]
    if kind == "separate":
        assert qat.max() == PEAK  # the QAT peak is reached after its re-warmup, however short the phase
    else:
        assert schedule(plan.fp_tokens) == PEAK  # QAT starts where the FP phase stopped: at the peak
    assert schedule(plan.total_tokens) == 0  # the run ends at the final rate
    # the decay starts where the schedule says: at the start of QAT under fused, 80% into it under separate
    decay_start = plan.fp_tokens if kind == "fused" else plan.fp_tokens + 0.8 * plan.qat_tokens
    mid = (np.arange(plan.fp_steps, plan.total_steps) + 0.5) * STEP
    assert np.all(qat[mid > decay_start] < PEAK) and np.all(np.diff(qat[mid > decay_start]) < 0)
    assert np.all(qat[(mid <= decay_start) & (mid >= plan.fp_tokens + 0.05 * plan.qat_tokens)] == PEAK)
    cooldown_steps = (plan.total_tokens - decay_start) / STEP
    assert qat[-1] == pytest.approx(PEAK * 0.5 / cooldown_steps)  # half a step from the end of a linear decay
    assert qat[-1] <= PEAK / 8  # at least four steps of decay: no run ends mid-flight


@pytest.mark.parametrize("kind", ["separate", "fused"])
def test_every_qat_phase_has_the_same_shape_whatever_its_length(kind):
    """The QAT rates as a function of the position in the phase, the same for every run of the grid."""
    x = np.linspace(0, 1, 401)[:-1]
    shapes = []
    for total, f, k in GRID:
        if k == kind:
            plan, schedule, _ = step_rates(total, f, kind)
            shapes.append([schedule(plan.fp_tokens + p * plan.qat_tokens) for p in x])
    np.testing.assert_allclose(shapes, np.broadcast_to(shapes[0], np.shape(shapes)), rtol=1e-12)


def test_the_old_inherited_qat_warmup_is_gone():
    """A 6-step QAT phase after a 10-step FP warmup (2,048 tokens a step): it warmed for 10 steps
    and ended at 55% of the peak when the QAT phase inherited the FP warmup."""
    cfg = config.TrainConfig(total_tokens=122_880, batch_size=16, seq_len=128, qat_fraction=0.1, warmup_tokens=20_480,
                             learning_rate=3e-3)
    plan = plan_run(cfg, 1)
    s = make_schedule(cfg, plan)
    assert plan.qat_steps == 6
    assert max(s.at_step(k, 2048) for k in range(plan.fp_steps, plan.total_steps)) == 3e-3
    assert s(plan.total_tokens) == 0
