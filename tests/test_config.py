"""Run configs: YAML + flags, validation, and the `auto` QAT fraction."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlx_qat import config, constants
from mlx_qat.scaling_law import predicted_qat_fraction, tokens_per_param_byte
from mlx_qat.schedule import plan_run


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
    ({"learning_rate": 0}, "learning_rate=0 must be a positive number"),
    ({"learning_rate": "abc"}, r"^learning_rate='abc' must be a positive number, e\.g\. 3e-3$"),
])
def test_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        config.load(None, overrides)


# (key, bad value, what the message shows; None: "key=value!r")
BAD = [
    ("data", 42, None), ("data", [], None), ("data", ["a.txt", 3], None), ("data", "", None), ("data", None, None),
    ("vocab_size", 100, None), ("vocab_size", "abc", None), ("vocab_size", 2048.5, None), ("vocab_size", True, None),
    ("data_cache", "", None), ("data_cache", 5, None),
    ("model", "huge", None), ("model", 5, None), ("model", ["tiny"], None), ("model", {"hidden_sise": 64}, "hidden_sise"),
    ("total_tokens", 0, None), ("total_tokens", -5, None), ("total_tokens", "abc", None), ("total_tokens", 1000000.5, None),
    ("total_tokens", "1.5", None), ("total_tokens", True, None), ("total_tokens", [1], None),
    ("batch_size", 0, None), ("batch_size", "x", None), ("seq_len", 0, None), ("seq_len", 1.5, None),
    ("learning_rate", "abc", None), ("learning_rate", -1, None), ("learning_rate", True, None), ("learning_rate", None, None),
    ("learning_rate", "nan", None), ("learning_rate", float("inf"), None), ("learning_rate", [3e-3], None),
    ("weight_decay", "abc", None), ("weight_decay", -0.1, None),
    ("beta1", 1, None), ("beta1", -0.1, None), ("beta1", "abc", None), ("beta2", 1.0, None), ("beta2", "x", None),
    ("grad_clip", -1, None), ("grad_clip", "abc", None),
    ("mode", "int4", None), ("mode", 4, None), ("mode", "mxfp4", "bits=2 cannot be used"),
    ("bits", 7, None), ("bits", "abc", None), ("bits", True, None),
    ("group_size", 48, None), ("group_size", "abc", None), ("group_size", 64.5, None),
    ("embedding_bits", 7, None), ("embedding_bits", "abc", None),
    ("qat_fraction", 1.5, None), ("qat_fraction", -0.1, None), ("qat_fraction", "half", None), ("qat_fraction", None, None),
    ("keep_optimizer_state", "maybe", None), ("keep_optimizer_state", 1, None), ("keep_optimizer_state", None, None),
    ("schedule", "cosine", None), ("schedule", 3, None),
    ("warmup", 1.5, None), ("warmup", -0.1, None), ("warmup", "abc", None),
    ("cooldown", 1.5, None), ("cooldown", "abc", None), ("cooldown", 0.99, "warmup + cooldown"),
    ("warmup_tokens", -1, None), ("warmup_tokens", "abc", None), ("warmup_tokens", 1.5, None),
    ("cooldown_tokens", -1, None), ("cooldown_tokens", "x", None),
    ("qat_warmup", 1.5, None), ("qat_warmup", "abc", None),
    ("qat_cooldown", -0.2, None), ("qat_cooldown", 0.99, "qat_warmup + qat_cooldown"),
    ("qat_warmup_tokens", -1, None), ("qat_warmup_tokens", 2.5, None),
    ("qat_cooldown_tokens", "x", None), ("qat_cooldown_tokens", -5, None),
    ("seed", "abc", None), ("seed", -1, None), ("seed", 0.5, None),
    ("report_every", 0, None), ("report_every", "abc", None), ("eval_every", 0, None), ("eval_every", "abc", None),
    ("eval_batches", 0, None), ("eval_batches", "abc", None), ("checkpoint_every", 0, None), ("checkpoint_every", "abc", None),
    ("snapshot_at", [0], None), ("snapshot_at", ["abc"], None), ("snapshot_at", [1.5], None), ("snapshot_at", {"a": 1}, None),
    ("snapshot_at", [1000, 3e6], "snapshot_at=[1000, 3000000]"),
    ("export_scales", "int8", None), ("export_scales", 16, None),
    ("report_to", "tensorboard", None), ("report_to", 5, None), ("project_name", "", None), ("project_name", 5, None),
    ("pretrained", "", None), ("pretrained", 5, None),
    ("loss", "mse", None), ("loss", "distill", "loss: distill needs a pretrained start"),
    ("kl_weight", 1.5, None), ("kl_weight", "abc", None), ("kl_weight", True, None),
    ("grad_checkpoint", "maybe", None), ("freeze_embedding", 1, None),
    ("compare", ["gptq"], None), ("compare", 5, None), ("compare", ["dwq"], "compare needs a pretrained start"),
    ("dwq_learning_rate", 0, None), ("dwq_learning_rate", "abc", None),
    ("fine_tune_type", "dora", None), ("fine_tune_type", 1, None),
    ("fine_tune_type", "lora", "fine_tune_type: lora needs a pretrained start"),
    ("lora_parameters", 8, None), ("lora_parameters", [8], None), ("lora_parameters", {"rank": 0}, "lora_parameters.rank=0"),
    ("lora_parameters", {"rank": 2.5}, "lora_parameters.rank=2.5"), ("lora_parameters", {"rank": True}, "rank=True"),
    ("lora_parameters", {"scale": -1}, "lora_parameters.scale=-1"), ("lora_parameters", {"scale": "x"}, "scale='x'"),
    ("lora_parameters", {"dropout": 1.0}, "lora_parameters.dropout=1.0"), ("lora_parameters", {"dropout": -0.1}, "dropout=-0.1"),
    ("lora_parameters", {"keys": []}, "lora_parameters.keys=[]"), ("lora_parameters", {"keys": [""]}, "keys=['']"),
    ("lora_parameters", {"keys": ["a", "a"]}, "keys=['a', 'a']"), ("lora_parameters", {"keys": [3]}, "keys=[3]"),
    ("lora_parameters", {"rnak": 8}, "unknown key 'rnak' in lora_parameters; did you mean 'rank'?"),
    ("num_layers", 0, None), ("num_layers", -1, None), ("num_layers", "all", None),
    ("num_layers", 4, "num_layers=4 chooses the blocks that fine_tune_type: lora adapts"),
    ("quantized_base", "keep", None), ("quantized_base", True, None),
    ("fp_scale", "fixed", None), ("fp_scale", "learned", "fp_scale=learned chooses an FP mode's scales"),
    ("quantized_base", "packed", "quantized_base: packed keeps a frozen base packed; full QAT trains"),
]


@pytest.mark.parametrize("key, value, shown", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_every_key_is_checked_at_construction(key, value, shown):
    with pytest.raises(ValueError) as e:
        config.TrainConfig(**{key: value})
    message = str(e.value)
    assert "\n" not in message and key in message
    assert (shown or f"{key}={value!r}") in message


def test_every_key_is_in_the_catalogue():
    assert {key for key, _, _ in BAD} == set(config.FIELDS)


def test_the_model_key_names_every_preset():
    from mlx_qat.model import PRESETS

    meta = config.FIELDS["model"].metadata
    with pytest.raises(ValueError) as e:
        config.TrainConfig(model=3)  # neither a name nor a mapping: the message is the key's `need`
    for name in PRESETS:
        assert re.search(rf"\b{name}\b", meta["help"]) and re.search(rf"\b{name}\b", str(e.value)), name


def test_reading_a_config_does_not_import_mlx_lm():
    code = "import sys, mlx_qat.config; print('mlx_lm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


YAML_NUMBERS = [
    "learning_rate: 1e-3\ntotal_tokens: 1e6\n",  # both strings in YAML 1.1
    "learning_rate: '1e-3'\ntotal_tokens: '1e6'\n",
    "learning_rate: 0.001\ntotal_tokens: 1_000_000\n",
    "learning_rate: 1.0e-3\ntotal_tokens: 1.0e+6\n",  # floats in YAML 1.1
]


@pytest.mark.parametrize("text", YAML_NUMBERS)
def test_numbers_as_typed_in_yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    cfg = config.load(path)
    assert cfg.learning_rate == 1e-3 and cfg.total_tokens == 1_000_000 and type(cfg.total_tokens) is int


@pytest.mark.parametrize("lr, tokens", [("1e-3", "1e6"), ("0.001", "1_000_000"), ("1e-3", "1000000.0"), ("'1e-3'", "'1e6'")])
def test_numbers_as_typed_in_flags(lr, tokens):
    cfg = config.load(None, config.parse_overrides(["--learning-rate", lr, f"--total-tokens={tokens}"]))
    assert cfg.learning_rate == 1e-3 and cfg.total_tokens == 1_000_000 and type(cfg.total_tokens) is int


def test_numbers_in_python():
    cfg = config.TrainConfig(learning_rate="1e-3", total_tokens=1e6, seed="7", grad_clip=1, warmup="0.1")
    assert (cfg.learning_rate, cfg.total_tokens, cfg.seed, cfg.grad_clip, cfg.warmup) == (1e-3, 1_000_000, 7, 1, 0.1)
    assert config.TrainConfig(bits="1.58", group_size="128", qat_fraction="0.3").spec.bits == 1.58


@pytest.mark.parametrize("text, value", [("true", True), ("no", False), ("off", False), ("yes", True)])
def test_booleans_as_yaml_writes_them(text, value):
    assert config.load(None, config.parse_overrides(["--keep-optimizer-state", text])).keep_optimizer_state is value


def test_flag_values_keep_their_dashes_and_bad_yaml_is_one_line():
    assert config.parse_overrides(["--data=my-dir", "--learning-rate=1e-3"]) == {"data": "my-dir", "learning_rate": "1e-3"}
    with pytest.raises(ValueError, match="not valid YAML") as e:
        config.parse_overrides(["--model", "{hidden_size: "])
    assert "\n" not in str(e.value)


def test_warmup_and_cooldown_in_tokens():
    cfg = config.load(None, config.parse_overrides(["--warmup-tokens", "1e5", "--cooldown-tokens", "0"]))
    assert (cfg.warmup_tokens, cfg.cooldown_tokens) == (100_000, 0)
    assert config.TrainConfig().warmup_tokens is None and config.TrainConfig().cooldown_tokens is None
    help_lines = config.describe_keys().splitlines()
    for key in ("warmup", "cooldown"):
        line = next(l for l in help_lines if l.startswith(f"  --{key}-tokens "))
        assert f"wins over `{key}`" in line and line.endswith("(default: None)")


def test_snapshots_are_sorted_positive_token_counts():
    step = dict(batch_size=10, seq_len=100)  # 1,000 tokens per step
    cfg = config.load(None, config.parse_overrides(["--snapshot-at", "[1e6, 5e5, 500_000, '2e5']", "--batch-size", "10", "--seq-len", "100"]))
    assert cfg.snapshot_at == [200_000, 500_000, 1_000_000]
    assert config.TrainConfig(snapshot_at="1e6", **step).snapshot_at == [1_000_000]
    assert config.TrainConfig(snapshot_at=None).snapshot_at == [] == config.TrainConfig().snapshot_at
    assert config.TrainConfig(snapshot_at=[2_000_000], **step).snapshot_at == [2_000_000]  # total_tokens itself is fine
    with pytest.raises(ValueError, match=r"snapshot_at=\[1500\] are not step boundaries.*multiples of .* 1000 tokens"):
        config.TrainConfig(snapshot_at=[1000, 1500], **step)
    assert "--snapshot-at" in config.describe_keys() and "(default: [])" in config.describe_keys()


ROUND_TRIP = [
    {},
    dict(data=["a.txt", "hf:x:train"], model={"preset": "tiny", "num_hidden_layers": 2}, total_tokens="1e7",
         learning_rate="1e-7", bits=1.58, group_size=None, embedding_bits=4, qat_fraction=0.3, keep_optimizer_state=False,
         warmup_tokens=1e5, cooldown_tokens=2e5, snapshot_at=[5e6, 1e6], batch_size=10, seq_len=100, export_scales="bfloat16", schedule="fused", seed=3),
    dict(pretrained="m", fine_tune_type="lora", qat_fraction=1, num_layers=4,
         lora_parameters={"rank": "16", "keys": "self_attn.q_proj", "dropout": 0.05}),
]


@pytest.mark.parametrize("values", ROUND_TRIP)
def test_to_dict_round_trips(values, tmp_path):
    cfg = config.TrainConfig(**values)
    assert config.TrainConfig(**cfg.to_dict()) == cfg
    path = tmp_path / "config.yaml"  # as a run writes its resolved config and reloads it on resume
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert config.load(path) == cfg
    assert config.load(path).to_dict() == cfg.to_dict()


@pytest.mark.slow
def test_train_cli_rejects_a_bad_value_before_reading_data(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {tmp_path / 'no' / 'such' / 'dir'}\ndata_cache: {tmp_path / 'cache'}\nmodel: tiny\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mlx_qat.train", "--config", str(cfg), "--out", str(out),
                           "--learning-rate", "abc"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: learning_rate='abc' must be a positive number, e.g. 3e-3"]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        config.load(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="needs a value"):
        config.parse_overrides(["--bits"])


CONFIGS = Path(__file__).parents[1] / "configs"
TRAIN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if "grid" not in yaml.safe_load(p.read_text()))


def test_the_shipped_train_configs_are_found():
    assert {"small", "tiny"} <= {p.stem for p in TRAIN_CONFIGS}


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_as_written(path):
    """Every key a shipped config sets keeps its value, the others their defaults, and its plan
    has both phases."""
    written = yaml.safe_load(path.read_text())
    cfg = config.load(path)
    assert cfg.to_dict() == {**{k: config.default(k) for k in config.FIELDS}, **written}
    plan = plan_run(cfg, n_params=1_000_000)
    assert plan.fp_steps > 0 and plan.qat_steps > 0 and plan.total_steps == cfg.total_tokens // cfg.tokens_per_step


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


def test_scales_dtype_names_match_the_export():
    from mlx_qat import export

    assert constants.SCALES_DTYPE_NAMES == tuple(export.SCALES_DTYPES)


# The roles of the keys, as the three lists that train.py, sweep.py and config.py kept said them
# (and report_to, project_name: where losses are also sent, which a resumed run may change).
RESUME_MAY_CHANGE = {"report_every", "eval_every", "checkpoint_every", "data_cache", "snapshot_at", "grad_checkpoint",
                     "report_to", "project_name"}
BRANCH_KEYS = {"total_tokens", "mode", "fp_scale", "bits", "group_size", "embedding_bits", "qat_fraction", "schedule", "cooldown",
               "cooldown_tokens", "qat_warmup", "qat_cooldown", "qat_warmup_tokens", "qat_cooldown_tokens",
               "keep_optimizer_state", "export_scales", "snapshot_at"}
PRETRAINED_DEFAULTS = {"qat_fraction": 1.0, "warmup": 0.02, "qat_warmup": 0.02, "learning_rate": 1e-4}


def test_the_key_roles_come_from_the_declarations():
    assert config.RESUME_MAY_CHANGE == RESUME_MAY_CHANGE
    assert config.BRANCH_KEYS == BRANCH_KEYS
    assert config.PRETRAINED_DEFAULTS == PRETRAINED_DEFAULTS


SECTIONS = ["data", "model", "tokens and batches", "optimizer", "QAT", "low-rank", "loss", "memory", "schedule", "run",
            "baselines"]


def test_help_lists_every_key_once_under_its_section():
    lines = config.describe_keys().split("\n")
    headings = [line[:-1] for line in lines if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == SECTIONS
    keys = [line.split()[0] for line in lines if line.startswith("  --")]
    assert keys == ["--" + name.replace("_", "-") for name in config.FIELDS]
    for name, f in config.FIELDS.items():
        line = f"  --{name.replace('_', '-'):<22} {f.metadata['help']} (default: {config.default(name)!r})"
        assert lines.count(line) == 1, line
    section_of, section = {}, None
    for line in lines:
        if line[:-1] in SECTIONS:
            section = line[:-1]
        elif line.startswith("  --"):
            section_of[line.split()[0]] = section
    assert section_of["--data"] == "data" and section_of["--pretrained"] == "model"
    assert section_of["--qat-cooldown-tokens"] == "schedule" and section_of["--dwq-learning-rate"] == "baselines"
    assert lines[-1] == ("a pretrained start (--init-from MODEL) changes the defaults of the keys you leave unset to "
                         "learning_rate: 0.0001, qat_fraction: 1, warmup: 0.02, qat_warmup: 0.02")


def test_lora_keys_in_mlx_lms_vocabulary():
    """lora_parameters takes mlx-lm's defaults for the parts left unset (null: all of them), and
    what low-rank QAT cannot do is one line each."""
    lora = config.resolve({"pretrained": "m", "fine_tune_type": "lora", "lora_parameters": {"rank": 16}})
    assert lora.lora_parameters == {"rank": 16, "scale": 20.0, "dropout": 0.0, "keys": None}
    assert lora.lora_arguments == {"rank": 16, "scale": 20.0, "dropout": 0.0, "keys": None, "num_layers": None}
    assert config.TrainConfig(lora_parameters=None).lora_parameters == config.default("lora_parameters")
    assert config.default("lora_parameters") == {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": None}
    assert config.default("fine_tune_type") == "full" and config.default("num_layers") is None
    assert config.resolve({"pretrained": "m", "fine_tune_type": "lora", "loss": "distill"}).loss == "distill"
    for values, message in (
        (dict(qat_fraction=0.5), "qat_fraction=0.5 cannot be used with fine_tune_type: lora"),
        (dict(lora_parameters={"dropout": 0.1}, grad_checkpoint=True), "lora_parameters.dropout=0.1 with grad_checkpoint"),
    ):
        with pytest.raises(ValueError) as e:
            config.resolve({"pretrained": "m", "fine_tune_type": "lora", **values})
        assert "\n" not in str(e.value) and message in str(e.value)
