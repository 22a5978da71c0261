"""Run configs: YAML + flags, validation, and the `auto` QAT fraction."""

import math

import pytest

from mlx_qat import config
from mlx_qat.law import predicted_qat_fraction, tokens_per_param_byte
from mlx_qat.train import plan_run


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("bits: 4\nbatch_size: 8\nqat_fraction: 0.3\n")
    cfg = config.load(path, config.parse_overrides(["--bits", "2", "--group-size", "null", "--seq-len=64"]))
    assert (cfg.bits, cfg.batch_size, cfg.group_size, cfg.seq_len, cfg.qat_fraction) == (2, 8, None, 64, 0.3)


def test_unknown_keys_suggest_the_nearest(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        config.load(path)
    with pytest.raises(ValueError, match="'qat_fractoin'.*did you mean 'qat_fraction'"):
        config.load(None, config.parse_overrides(["--qat-fractoin", "0.2"]))


@pytest.mark.parametrize("overrides, message", [
    ({"bits": 7}, "bits=7 is not supported"),
    ({"group_size": 48}, "group_size=48 is not supported"),
    ({"qat_fraction": 1.5}, "qat_fraction=1.5"),
    ({"qat_fraction": "half"}, "qat_fraction='half'"),
    ({"schedule": "cosine"}, "schedule='cosine'"),
    ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
    ({"total_tokens": 100}, "less than one step"),
    ({"learning_rate": 0}, "learning_rate=0 must be positive"),
])
def test_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        config.load(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        config.load(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="needs a value"):
        config.parse_overrides(["--bits"])


def test_shipped_configs_load():
    for name in ("tiny", "small"):
        config.load(f"configs/{name}.yaml")


@pytest.mark.parametrize("n_params, total_tokens, bits", [(1_000_000, 10_000_000, 2), (5_000_000, 1_000_000_000, 4), (2e8, 4e9, 1.58)])
def test_auto_fraction_follows_the_predictor(n_params, total_tokens, bits):
    cfg = config.TrainConfig(total_tokens=int(total_tokens), batch_size=8, seq_len=128, bits=bits, qat_fraction="auto")
    plan = plan_run(cfg, int(n_params))
    s = plan.total_tokens / (n_params * bits / 8)
    expected = math.exp(-6.7297 / math.log(s))
    assert plan.qat_fraction == pytest.approx(expected, abs=1 / plan.total_steps)
    assert plan.fp_steps + plan.qat_steps == total_tokens // 1024
    assert float(tokens_per_param_byte(plan.total_tokens, n_params, bits)) == pytest.approx(s)


def test_predictor_values_from_the_paper():
    assert float(predicted_qat_fraction(20)) == pytest.approx(0.106, abs=0.005)
    assert float(predicted_qat_fraction(1e3)) == pytest.approx(0.377, abs=0.005)
    assert float(predicted_qat_fraction(1e5)) == pytest.approx(0.557, abs=0.005)
    with pytest.raises(ValueError, match="S_total > 1"):
        predicted_qat_fraction(0.5)


def test_fixed_fractions_split_the_steps():
    cfg = config.TrainConfig(total_tokens=100 * 1024, batch_size=8, seq_len=128, qat_fraction=0.25)
    plan = plan_run(cfg, 10_000)
    assert (plan.fp_steps, plan.qat_steps) == (75, 25)
    assert plan_run(config.TrainConfig(total_tokens=100 * 1024, batch_size=8, seq_len=128, qat_fraction=0), 1).qat_steps == 0
    assert plan_run(config.TrainConfig(total_tokens=100 * 1024, batch_size=8, seq_len=128, qat_fraction=1), 1).fp_steps == 0
