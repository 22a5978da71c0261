"""Sweeps: grid expansion, trunks and branch points, sharding, resume, and records that an
independent run reproduces."""

import json
from dataclasses import replace

import pytest
import yaml

from conftest import MICRO_MODEL, read_jsonl
from mlx_qat import checkpoint, config, report, sweep, train

def write_sweep(tmp_path, dataset, grid, fp_baselines=True, **base):
    values = dict(data=str(dataset), model=MICRO_MODEL, total_tokens=40 * 128, batch_size=4, seq_len=32, bits=2,
                  group_size=32, warmup_tokens=4 * 128, report_every=5, eval_every=100, eval_batches=2,
                  checkpoint_every=10, learning_rate=3e-3)
    values.update(base)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(values))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "set": {"eval_batches": 2}, "grid": grid, "fp_baselines": fp_baselines}, sort_keys=False))
    return path


GRID = {"total_tokens": [40 * 128, 60 * 128], "qat_fraction": [0.25, 0.5], "schedule": ["separate", "fused"]}


def planned(path):
    base, grid, fp = sweep.read_sweep(path)
    runs = sweep.expand(base, grid, fp)
    trunks = sweep.attach_trunks(runs, {sweep.trunk_key(r.cfg): 100_000 for r in runs})
    return runs, trunks


def test_grid_expansion_branch_points_and_trunks(dataset, tmp_path):
    runs, trunks = planned(write_sweep(tmp_path, dataset, GRID))
    assert len(runs) == 8 + 2  # the crossed grid, then one FP baseline per total_tokens
    assert [r.name for r in runs][:2] == ["total_tokens-5120_qat_fraction-0.25_schedule-separate",
                                          "total_tokens-5120_qat_fraction-0.25_schedule-fused"]
    assert len(trunks) == 1 and len(trunks[0].runs) == 10  # total_tokens, fraction and schedule branch off
    by_name = {r.name: r for r in runs}
    # fused leaves the trunk at D_fp (30 of 40 steps); separate at its FP cooldown's start
    # (20% of 30 steps = 6 steps, so step 24); an FP baseline at its own cooldown (40 - 8 = 32)
    assert by_name["total_tokens-5120_qat_fraction-0.25_schedule-fused"].branch_tokens == 30 * 128
    assert by_name["total_tokens-5120_qat_fraction-0.25_schedule-separate"].branch_tokens == 24 * 128
    assert by_name["fp_total_tokens-5120"].branch_tokens == 32 * 128
    assert trunks[0].cfg.total_tokens == max(r.branch_tokens for r in runs)
    assert trunks[0].cfg.snapshot_at == sorted({r.branch_tokens for r in runs})
    assert trunks[0].cfg.qat_fraction == 0 and trunks[0].cfg.cooldown_tokens == 0


def test_a_warmup_fraction_becomes_the_same_tokens_for_every_run(dataset, tmp_path):
    runs, _ = planned(write_sweep(tmp_path, dataset, GRID, warmup_tokens=None, warmup=0.1))
    assert {r.cfg.warmup_tokens for r in runs} == {512}  # 10% of the shortest run's 5,120 tokens


def test_the_plan_counts_only_what_is_left(dataset, tmp_path):
    s = sweep.Sweep(write_sweep(tmp_path, dataset, GRID), tmp_path / "out")
    assert sum(sweep.tokens_left(s, {}).values()) == s.figures()["tokens_trained"]
    (trunk,), (first, *rest) = s.trunks, s.trunks[0].runs
    done = {r.name: {} for r in rest}
    assert sum(sweep.tokens_left(s, done).values()) == trunk.cfg.total_tokens + first.cfg.total_tokens - first.branch_tokens
    assert sweep.tokens_left(s, {r.name: {} for r in s.runs}) == {}
    left = sweep.tokens_left(s, done)
    text = sweep.format_plan(s, done, left, {sweep.trunk_key(first.cfg): 128.0})
    assert "10 runs (10 in the whole sweep, 9 finished)" in text
    hours = (trunk.cfg.total_tokens + first.cfg.total_tokens - first.branch_tokens) / 128 / 3600
    assert f"ETA {hours:.2f} h of training for what is left" in text
    s.trunk_dir(trunk).mkdir(parents=True)
    (s.trunk_dir(trunk) / report.SUMMARY).write_text("{}")  # a finished trunk is not trained again
    assert sum(sweep.tokens_left(s, done).values()) == first.cfg.total_tokens - first.branch_tokens


def test_keys_a_resumed_run_may_change_do_not_rename_trunks(dataset, tmp_path):
    runs, _ = planned(write_sweep(tmp_path, dataset, GRID))
    cfg = runs[0].cfg
    assert sweep.trunk_key(replace(cfg, report_every=7, data_cache=str(tmp_path))) == sweep.trunk_key(cfg)
    assert sweep.trunk_key(replace(cfg, learning_rate=1e-3)) != sweep.trunk_key(cfg)


def test_sharding_is_deterministic_disjoint_and_keeps_trunks_whole(dataset, tmp_path):
    grid = {**GRID, "seed": [0, 1, 2]}  # three trunks
    runs, trunks = planned(write_sweep(tmp_path, dataset, grid))
    assert len(trunks) == 3
    shards = [sweep.shard(trunks, [], i, 2) for i in range(2)]
    assert shards == [sweep.shard(trunks, [], i, 2) for i in range(2)]
    names = [t.name for ts, _ in shards for t in ts]
    assert sorted(names) == sorted(t.name for t in trunks) and len(set(names)) == 3
    assert all(ts for ts, _ in shards)


@pytest.mark.parametrize("doc, message", [
    ({"base": "base.yaml", "grid": {"bits": [2]}, "gird": {}}, "unknown sweep key"),
    ({"grid": {"bits": [2]}}, "needs `base:`"),
    ({"base": "missing.yaml", "grid": {"bits": [2]}}, "does not exist"),
    ({"base": "base.yaml", "grid": {"bits": []}}, "grid.bits must be a non-empty list"),
    ({"base": "base.yaml", "grid": {"bits": 2}}, "grid.bits must be a non-empty list"),
    ({"base": "base.yaml", "grid": {"bitz": [2]}}, "did you mean 'bits'"),
    ({"base": "base.yaml", "grid": {"bits": [2, 7]}}, "run bits-7: bits=7"),
    ({"base": "base.yaml", "grid": {"snapshot_at": [[512]]}}, "set by the sweep"),
    ({"base": "base.yaml", "grid": {}}, "the grid is empty"),
    ({"base": "base.yaml", "grid": {"bits": [2, 2]}}, "repeats a value"),
    ({"base": "base.yaml", "grid": {"qat_fraction": [0.5, 0.95]}},
     "1 runs of the grid are refused: run qat_fraction-0.95: the FP phase \\(256 tokens\\) is too short"),
])
def test_bad_sweep_files_are_clear_errors(dataset, tmp_path, doc, message):
    write_sweep(tmp_path, dataset, {"bits": [2]})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=message):
        base, grid, fp = sweep.read_sweep(tmp_path / "bad.yaml")
        sweep.expand(base, grid, fp)


def test_cli_rejects_a_bad_file_before_training(dataset, tmp_path, capsys):
    write_sweep(tmp_path, dataset, {"bits": [2]})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"qat_fraction": [0.5, 2]}}))
    with pytest.raises(SystemExit) as e:
        sweep.main(["--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "qat_fraction=2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


SMALL_GRID = {"qat_fraction": [0.25, 0.5], "schedule": ["separate", "fused"]}





@pytest.mark.slow
def test_a_sweep_record_equals_an_independent_run(dataset, tmp_path):
    path = write_sweep(tmp_path, dataset, SMALL_GRID)
    figures = sweep.run_sweep(sweep.Sweep(path, tmp_path / "out"))
    assert figures["runs_finished"] == figures["runs_total"] == 5
    assert figures["tokens_trained"] < figures["tokens_independent"]
    results = {r["name"]: r for r in read_jsonl(tmp_path / "out" / "results.jsonl")}
    assert len(results) == 5 and results["fp_total_tokens-5120"]["B"] is None
    for name in ("qat_fraction-0.5_schedule-separate", "qat_fraction-0.25_schedule-fused"):
        record = results[name]
        assert record["branch_tokens"] > 0 and record["fp_val_loss"] is not None
        alone = train.run(config.TrainConfig(**record["config"]), tmp_path / name, show_progress=False)
        assert alone["final_val_loss"] == pytest.approx(record["final_val_loss"], abs=1e-4)


@pytest.mark.slow
def test_a_killed_sweep_resumes_with_exactly_the_right_records(dataset, tmp_path, monkeypatch):
    path = write_sweep(tmp_path, dataset, SMALL_GRID)
    out = tmp_path / "out"

    class Killed(Exception):
        pass

    def kill_when(predicate, target, name):
        original = getattr(target, name)

        def wrapper(*args, **kwargs):
            if predicate(*args):
                raise Killed()
            return original(*args, **kwargs)
        monkeypatch.setattr(target, name, wrapper)
        return original

    # 1. during the trunk: at its second checkpoint
    save = kill_when(lambda p, *a: "trunks" in str(p) and p.name == checkpoint.NAME and a[2]["step"] == 20,
                     checkpoint, "save")
    with pytest.raises(Killed):
        sweep.run_sweep(sweep.Sweep(path, out))
    monkeypatch.setattr(checkpoint, "save", save)
    # 2. during a branch: the third run's first checkpoint
    save = kill_when(lambda p, *a: "runs" in str(p) and len(list((out / "runs").iterdir())) == 3, checkpoint, "save")
    with pytest.raises(Killed):
        sweep.run_sweep(sweep.Sweep(path, out))
    monkeypatch.setattr(checkpoint, "save", save)
    assert len(read_jsonl(out / "results.jsonl")) == 2
    # 3. during an append: the fourth record
    append = kill_when(lambda p, line: len(read_jsonl(p)) == 3, sweep.atomic, "append_line")
    with pytest.raises(Killed):
        sweep.run_sweep(sweep.Sweep(path, out))
    monkeypatch.setattr(sweep.atomic, "append_line", append)
    assert len(read_jsonl(out / "results.jsonl")) == 3

    figures = sweep.run_sweep(sweep.Sweep(path, out))
    names = [r["name"] for r in read_jsonl(out / "results.jsonl")]
    assert sorted(names) == sorted(r.name for r in sweep.Sweep(path, out).runs) and len(names) == 5
    assert figures["runs_finished"] == 5
    again = sweep.run_sweep(sweep.Sweep(path, out))  # nothing left to do, nothing duplicated
    assert [r["name"] for r in read_jsonl(out / "results.jsonl")] == names and again["runs_finished"] == 5


@pytest.mark.slow
def test_a_sweep_resumes_from_its_results_alone(dataset, tmp_path, monkeypatch):
    """On a machine with only the results directory: finished runs are not trained again, the
    unfinished trunk is, and the records end complete and unduplicated."""
    path, committed = write_sweep(tmp_path, dataset, SMALL_GRID), tmp_path / "committed"
    append = sweep.atomic.append_line

    def killed_at_third_record(p, line):
        if p.exists() and len(read_jsonl(p)) == 2:
            raise KeyboardInterrupt
        append(p, line)
    monkeypatch.setattr(sweep.atomic, "append_line", killed_at_third_record)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(sweep.Sweep(path, tmp_path / "first", results_dir=committed))
    monkeypatch.setattr(sweep.atomic, "append_line", append)
    first = [r["name"] for r in read_jsonl(committed / "results.jsonl")]
    assert len(first) == 2 and not (committed / "trunks").exists()

    trained = []
    run_to_end = train.run_to_end
    monkeypatch.setattr(train, "run_to_end", lambda cfg, out, *a, **k: trained.append(out.name) or run_to_end(cfg, out, *a, **k))
    figures = sweep.run_sweep(sweep.Sweep(path, tmp_path / "second", results_dir=committed))
    names = [r["name"] for r in read_jsonl(committed / "results.jsonl")]
    assert names[:2] == first and sorted(names) == sorted(r.name for r in sweep.Sweep(path, tmp_path / "x").runs)
    assert trained[0].startswith("trunk_") and set(trained[1:]) == set(names[2:])  # the trunk again, then the rest
    assert figures["runs_finished"] == 5 and json.loads((committed / "sweep.json").read_text())["runs_finished"] == 5


def test_runs_whose_split_depends_on_n_are_checked_once_n_is_known(dataset, tmp_path):
    """qat_fraction auto: the schedule check waits for N, then names every refused run."""
    path = write_sweep(tmp_path, dataset, {"seed": [0, 1]}, fp_baselines=False, qat_fraction="auto",
                       total_tokens=400 * 128, warmup_tokens=399 * 128)
    base, grid, fp = sweep.read_sweep(path)
    runs = sweep.expand(base, grid, fp)  # nothing to refuse before N is known
    n_params = {sweep.trunk_key(r.cfg): 1_000 for r in runs}  # S_total = 204.8: f = 0.28, an FP phase of 288 steps
    with pytest.raises(sweep.SweepError, match="2 runs of the grid are refused: run seed-0: the FP phase"):
        sweep.check_schedules(runs, n_params)
