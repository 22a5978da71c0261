"""Sweeps: grids of training runs that share their full-precision prefixes, run resumably.

    python -m mlx_qat.sweep --config configs/sweep_local.yaml --out sweeps/local [--dry-run] [--shard i/n]

The sweep file names a base train config, overrides for every run, and a grid of train-config
keys whose lists are crossed:

    base: tiny.yaml            # path relative to the sweep file
    set: {eval_batches: 8}     # optional
    grid: {model: [tiny, small], total_tokens: [1_000_000, 4_000_000], bits: [1, 2, 4],
           qat_fraction: [0.1, 0.25, 0.4, 0.6, 0.8], schedule: [separate, fused]}
    fp_baselines: true         # also one FP-only run per (FP trajectory, total_tokens)

`grid` may also be a list of such mappings: the sweep is the union of their crossings (e.g. both
schedules at one model size, one schedule at the others).

Sharing: runs whose configs agree on every key that shapes the FP trajectory (model, data, seed,
optimizer, warmup, batch shape, ...) share one FP *trunk*, trained once at the peak learning rate
after a warmup of fixed tokens, with a snapshot wherever a run leaves it. A run leaves the trunk
where its own schedule departs from the trunk's constant rate: at D_fp under `fused`, at the start
of its FP cooldown under `separate` (and for an FP-only baseline), rounded down to a step. From
its snapshot it trains on as an ordinary `--init-from` run, so each record's `config` given to
`python -m mlx_qat.train` reproduces that run on its own.

DIR receives trunks/, runs/, results.jsonl (one record per finished run, appended atomically)
and sweep.json (the plan and what was measured); `--results-dir` keeps the last two elsewhere
(e.g. under version control). Rerunning the same command resumes: finished runs are neither
redone nor duplicated, killed trunks and runs continue from their checkpoints, and on a machine
with the results alone the unfinished trunks are trained again and branched from.
`--shard i/n` splits the trunks (with their runs) deterministically over n processes/machines;
each shard writes results-i-of-n.jsonl, and `mlx_qat.fit DIR` reads them all. Under `mlx.launch`
each rank takes its shard by itself (rank i of n, every run trained by one rank alone, not data
parallel), and when all are done rank 0 merges the shards into one results.jsonl:

    mlx.launch --hostfile hosts.json python -m mlx_qat.sweep --config sweep.yaml --out DIR

One module holds the grid, its trunks, the sweep directory and the command, because each step
(expansion, branch points, sharding, resume) reads the same Run and Trunk records.
"""

import argparse
import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import yaml

from . import atomic, checkpoint, config, data, distributed, model as models, report, results, train
from .checkpointer import DivergenceError
from .schedule import RunPlan, make_schedule, plan_run
from .start import StartError
from .step import build_step

SWEEP_KEYS = ("base", "set", "grid", "fp_baselines")
SET_BY_SWEEP = {"snapshot_at"}


class SweepError(ValueError):
    """A sweep file or directory that cannot be used, with what to do about it."""


@dataclass
class Run:
    name: str
    cfg: config.TrainConfig
    branch_tokens: int = 0  # where it leaves its trunk (0: trains from scratch)
    trunk: Optional[str] = None


@dataclass
class Trunk:
    name: str
    cfg: config.TrainConfig  # FP only, constant rate after warmup, snapshots at its runs' branch points
    runs: List[Run] = field(default_factory=list)


# ---------------------------------------------------------------- reading and expanding


def _value_name(value) -> str:
    if isinstance(value, (dict, list)):
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return str(value)


def read_sweep(path: Path) -> Tuple[dict, List[dict], bool]:
    """(base values with `set` applied, grids, fp_baselines) from a sweep file, checked."""
    path = Path(path)
    if not path.exists():
        raise SweepError(f"sweep file {path} does not exist")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise SweepError(f"{path} must be a YAML mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = set(doc) - set(SWEEP_KEYS)
    if unknown:
        raise SweepError(f"unknown sweep key(s) {', '.join(sorted(unknown))} in {path}; use {', '.join(SWEEP_KEYS)}")
    if "base" not in doc or "grid" not in doc:
        raise SweepError(f"{path} needs `base:` (a train config) and `grid:` (keys -> lists of values)")
    base_path = path.parent / doc["base"]
    if not base_path.exists():
        raise SweepError(f"{path}: base config {base_path} does not exist")
    base = yaml.safe_load(base_path.read_text()) or {}
    overrides = doc.get("set") or {}
    grids = doc["grid"] if isinstance(doc["grid"], list) else [doc["grid"]]
    for name, mapping in [("set", overrides), (str(base_path), base)] + [("grid", g) for g in grids]:
        if not isinstance(mapping, dict):
            raise SweepError(f"{path}: `{name}` must be a mapping of train-config keys")
        config.check_keys(mapping, f"{path} ({name})")
    if SET_BY_SWEEP & set(overrides):
        raise SweepError(f"{path}: {', '.join(SET_BY_SWEEP & set(overrides))} is set by the sweep itself; leave it out")
    for grid in grids:
        _check_grid(grid, path)
    fp_baselines = doc.get("fp_baselines", False)
    if not isinstance(fp_baselines, bool):
        raise SweepError(f"{path}: fp_baselines must be true or false")
    return {**base, **overrides}, grids, fp_baselines


def _check_grid(grid: dict, path: Path) -> None:
    if not grid:
        raise SweepError(f"{path}: the grid is empty; give at least one key with a list of values")
    for key, values in grid.items():
        if key in SET_BY_SWEEP:
            raise SweepError(f"{path}: `{key}` is set by the sweep itself; leave it out")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list of values")
        if len({_value_name(v) for v in values}) != len(values):
            raise SweepError(f"{path}: grid.{key} repeats a value")


def expand(base: dict, grids: List[dict], fp_baselines: bool) -> List[Run]:
    """Every run of each grid (keys crossed in file order; a list of grids is their union),
    then the FP baselines; checked as train configs. Warmup is fixed in tokens so that runs
    can share their FP trunk."""
    points = []
    for grid in grids:
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            points.append(("_".join(f"{k}-{_value_name(v)}" for k, v in point.items()), {**base, **point}))
    runs = _runs(points)
    shortest = min(r.cfg.total_tokens for r in runs)
    if any(r.cfg.warmup_tokens is None for r in runs):  # a warmup given as a fraction becomes tokens: the shortest run's
        runs = _runs([(r.name, {**r.cfg.to_dict(), "warmup_tokens": round(r.cfg.warmup * shortest)})
                      if r.cfg.warmup_tokens is None else (r.name, r.cfg.to_dict()) for r in runs])
    if fp_baselines:
        keys = list(dict.fromkeys(k for grid in grids for k in grid if k not in config.BRANCH_KEYS))
        seen = {}
        for r in runs:
            key = (trunk_key(r.cfg), r.cfg.total_tokens)
            if key not in seen:
                point = {**{k: getattr(r.cfg, k) for k in keys}, "total_tokens": r.cfg.total_tokens}
                name = "fp_" + "_".join(f"{k}-{_value_name(v)}" for k, v in point.items())
                seen[key] = Run(name, replace(r.cfg, qat_fraction=0.0))
        runs += seen.values()
    return runs


def _runs(points: List[Tuple[str, dict]]) -> List[Run]:
    """The runs of (name, config values) pairs, or one error naming every refused run."""
    runs, refused = [], []
    for name, values in points:
        try:
            runs.append(Run(name, _config(values, name)))
        except SweepError as e:
            refused.append(str(e))
    refuse(refused)
    return runs


def _config(values: dict, name: str) -> config.TrainConfig:
    try:
        cfg = config.resolve(values)  # as a run's config: an FP mode fills in its bits and group_size
    except (TypeError, ValueError) as e:
        raise SweepError(f"run {name}: {e}") from e
    if cfg.pretrained is not None:
        raise SweepError(f"run {name}: sweeps train from scratch; start from a pretrained model with "
                         "`python -m mlx_qat.train --init-from MODEL`, one run at a time")
    return cfg


def trunk_key(cfg: config.TrainConfig) -> str:
    """What names a trunk: every key that shapes the FP trajectory (not those a resumed run may change)."""
    shared = {k: v for k, v in cfg.to_dict().items() if k not in config.BRANCH_KEYS | config.RESUME_MAY_CHANGE}
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()[:10]


def branch_point(cfg: config.TrainConfig, plan: RunPlan) -> int:
    """The last step boundary up to which the run's learning rates equal a constant-rate trunk's:
    where its FP phase's cooldown starts (none under fused: where QAT starts)."""
    if plan.fp_steps == 0:
        return 0
    _, _, length, _, cooldown = next(make_schedule(cfg, plan).phases())
    return int((length - cooldown) // plan.tokens_per_step) * plan.tokens_per_step


def check_schedules(runs: List[Run], n_params: Dict[str, int]) -> None:
    """Refuse the sweep, naming every run whose phases cannot be whole once N is known (the runs
    with qat_fraction auto, whose split depends on it)."""
    refused = []
    for r in runs:
        try:
            make_schedule(r.cfg, plan_run(r.cfg, n_params[trunk_key(r.cfg)]))
        except ValueError as e:
            refused.append(f"run {r.name}: {e}")
    refuse(refused)


def refuse(refused: List[str]) -> None:
    """One SweepError naming the refused runs (the first three, and how many more)."""
    if refused:
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        raise SweepError(f"{len(refused)} runs of the grid are refused: {'; '.join(refused[:3])}{more}")


def attach_trunks(runs: List[Run], n_params: Dict[str, int]) -> List[Trunk]:
    """Group the runs by FP trajectory and give each group its trunk (runs that leave at
    token 0 train alone)."""
    trunks: Dict[str, Trunk] = {}
    for r in runs:
        key = trunk_key(r.cfg)
        r.branch_tokens = branch_point(r.cfg, plan_run(r.cfg, n_params[key]))
        if r.branch_tokens == 0:
            continue
        if key not in trunks:
            model = r.cfg.model if isinstance(r.cfg.model, str) else _value_name(r.cfg.model)
            trunks[key] = Trunk(f"trunk_model-{model}_{key}", r.cfg)
        r.trunk = trunks[key].name
        trunks[key].runs.append(r)
    for t in trunks.values():
        points = sorted({r.branch_tokens for r in t.runs})
        t.cfg = replace(t.cfg, qat_fraction=0.0, cooldown_tokens=0, total_tokens=points[-1], snapshot_at=points)
    return list(trunks.values())


def shard(trunks: List[Trunk], alone: List[Run], index: int, count: int) -> Tuple[List[Trunk], List[Run]]:
    """Shard `index` of `count`: whole trunks (with their runs) and lone runs dealt out by
    tokens, largest first, each to the least loaded shard — deterministic and disjoint."""
    units = [(tokens_of(t), t.name, t) for t in trunks] + [(r.cfg.total_tokens, r.name, r) for r in alone]
    loads, mine = [0] * count, []
    for tokens, _, unit in sorted(units, key=lambda u: (-u[0], u[1])):
        i = loads.index(min(loads))
        loads[i] += tokens
        if i == index:
            mine.append(unit)
    return [u for u in mine if isinstance(u, Trunk)], [u for u in mine if isinstance(u, Run)]


def tokens_of(t: Trunk, runs: Optional[List[Run]] = None) -> int:
    """Tokens to train for a trunk and its runs (or only `runs` of them)."""
    return t.cfg.total_tokens + sum(r.cfg.total_tokens - r.branch_tokens for r in (t.runs if runs is None else runs))


# ---------------------------------------------------------------- the sweep directory


class Sweep:
    def __init__(self, path: Path, out: Path, shard_spec: Tuple[int, int] = (0, 1), results_dir: Optional[Path] = None):
        self.out, (self.index, self.count) = Path(out), shard_spec
        base, grids, fp_baselines = read_sweep(path)
        runs = expand(base, grids, fp_baselines)
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise SweepError(f"{path}: two runs of the grid have the same name")
        first_of_trunk = {trunk_key(r.cfg): r.cfg for r in reversed(runs)}  # one model built per trunk
        self.n_params = {key: count_params(cfg) for key, cfg in first_of_trunk.items()}
        check_schedules(runs, self.n_params)
        trunks = attach_trunks(runs, self.n_params)
        alone = [r for r in runs if r.trunk is None]
        self.all_runs = runs
        self.trunks, self.alone = shard(trunks, alone, self.index, self.count)
        suffix = "" if self.count == 1 else f"-{self.index}-of-{self.count}"
        results_dir = self.out if results_dir is None else Path(results_dir)
        self.results_path = results_dir / f"results{suffix}.jsonl"
        self.summary_path = results_dir / f"sweep{suffix}.json"

    def trunk_dir(self, trunk: Trunk) -> Path:
        return self.out / "trunks" / trunk.name

    @property
    def runs(self) -> List[Run]:
        return [r for t in self.trunks for r in t.runs] + self.alone

    def finished(self) -> Dict[str, dict]:
        """Every run recorded in the results directory, by any shard (however the sweep was split before)."""
        return {r["name"]: r for r in read_records(self.results_path.parent)}

    def figures(self) -> dict:
        runs = self.runs
        return dict(
            runs_total=len(runs),
            trunks=len(self.trunks),
            branch_points=sum(len(t.cfg.snapshot_at) for t in self.trunks),
            tokens_trained=sum(tokens_of(t) for t in self.trunks) + sum(r.cfg.total_tokens for r in self.alone),
            tokens_independent=sum(r.cfg.total_tokens for r in runs),
        )


def count_params(cfg: config.TrainConfig) -> int:
    """N of the run's model; the vocabulary comes from its (prepared, cached) data."""
    dataset = data.load(cfg)
    return models.num_params(models.build(models.model_args(cfg.model, dataset.vocab_size), cfg.seed))


def measure_rate(cfg: config.TrainConfig, steps: int = 3) -> float:
    """Training tokens per second of a config, from a few steps (a run's own step, on a
    freshly built model) after a warm-up one."""
    dataset = data.load(cfg)
    model = models.build(models.model_args(cfg.model, dataset.vocab_size), cfg.seed)
    _, train_step = build_step(model, cfg)
    batch = lambda k: mx.array(data.batch(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, k))  # noqa: E731
    mx.eval(train_step(batch(0)))
    start = time.perf_counter()
    for k in range(1, steps + 1):
        mx.eval(train_step(batch(k)))
    return steps * cfg.tokens_per_step / (time.perf_counter() - start)


def versions() -> dict:
    return {name: metadata.version(name) for name in ("mlx_qat", "mlx", "mlx-lm")}


def read_records(results_dir: Path) -> List[dict]:
    """The records of results.jsonl and every shard's results-i-of-n.jsonl in `results_dir`."""
    return [json.loads(line) for f in results.shard_files(results_dir) for line in f.read_text().splitlines() if line.strip()]


def merge_results(results_dir: Path) -> Path:
    """Fold the shards' results into one results.jsonl (each run once), then drop the shard files."""
    merged, path = {}, Path(results_dir) / "results.jsonl"
    for record in read_records(results_dir):
        merged.setdefault(record["name"], record)
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in merged.values()))
    for f in results.shard_files(results_dir):
        if f != path:
            f.unlink()
    return path


def result_record(run: Run, summary: dict) -> dict:
    keys = ("N", "D_fp", "D_qat", "B", "mode", "fp_scale", "group_size", "schedule", "qat_fraction", "S_total",
            "final_val_loss", "fp_val_loss", "exported_val_loss", "tokens_per_s")
    return {"name": run.name, **{k: summary[k] for k in keys}, "wall_seconds": summary["train_seconds"],
            "branch_tokens": run.branch_tokens, "trunk": run.trunk, "versions": versions(), "config": run.cfg.to_dict()}


def run_sweep(sweep: Sweep) -> dict:
    """Train what is left of the sweep's shard; sweep.json is rewritten after every run, so its
    figures (runs finished, wall time over all sittings) hold even for a sweep that was killed."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    sweep.results_path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(sweep.summary_path.read_text()) if sweep.summary_path.exists() else {}
    started = time.perf_counter()
    done = sweep.finished()

    def figures() -> dict:
        f = {**sweep.figures(), "runs_finished": sum(r.name in done for r in sweep.runs),
             "wall_seconds": previous.get("wall_seconds", 0.0) + time.perf_counter() - started,
             "shard": f"{sweep.index}/{sweep.count}"}
        atomic.write_text(sweep.summary_path, json.dumps(f, indent=2))
        return f

    def record(run: Run, summary: dict) -> None:
        if run.name not in done:
            done[run.name] = result_record(run, summary)
            atomic.append_line(sweep.results_path, json.dumps(done[run.name]))
        figures()

    for trunk in sorted(sweep.trunks, key=lambda t: -len(t.runs) / tokens_of(t)):  # most runs per token first
        todo = [r for r in trunk.runs if r.name not in done]
        if not todo:
            continue
        trunk_dir = sweep.trunk_dir(trunk)
        print(f"trunk {trunk.name}: {trunk.cfg.total_tokens:,} tokens, {len(todo)} runs to branch", file=sys.stderr)
        train.run_to_end(trunk.cfg, trunk_dir, alone=True)
        for r in todo:
            print(f"run {r.name} (from {r.branch_tokens:,} tokens)", file=sys.stderr)
            snapshot = checkpoint.snapshot_path(trunk_dir, r.branch_tokens)
            record(r, train.run_to_end(r.cfg, sweep.out / "runs" / r.name, snapshot, alone=True))
    for r in sweep.alone:
        if r.name not in done:
            print(f"run {r.name} (from scratch)", file=sys.stderr)
            record(r, train.run_to_end(r.cfg, sweep.out / "runs" / r.name, alone=True))
    return figures()


# ---------------------------------------------------------------- the command


def tokens_left(sweep: Sweep, done: Dict[str, dict]) -> Dict[str, int]:
    """Tokens still to train per trunk config: an unfinished trunk (counted whole, though a
    killed one resumes part-way) and its unfinished runs' own tokens, or an unfinished run that
    trains alone."""
    left: Dict[str, int] = {}
    for t in sweep.trunks:
        todo = [r for r in t.runs if r.name not in done]
        if todo:
            key = trunk_key(t.cfg)
            trunk_done = (sweep.trunk_dir(t) / report.SUMMARY).exists()
            left[key] = left.get(key, 0) + tokens_of(t, todo) - (t.cfg.total_tokens if trunk_done else 0)
    for r in sweep.alone:
        if r.name not in done:
            key = trunk_key(r.cfg)
            left[key] = left.get(key, 0) + r.cfg.total_tokens
    return left


def format_plan(sweep: Sweep, done: Dict[str, dict], left: Dict[str, int], rates: Dict[str, float]) -> str:
    f = sweep.figures()
    finished = sum(r.name in done for r in sweep.runs)
    lines = [f"{f['runs_total']} runs ({len(sweep.all_runs)} in the whole sweep, {finished} finished), "
             f"{f['trunks']} FP trunks, {f['branch_points']} branch points"]
    for t in sweep.trunks:
        points = ", ".join(f"{p:,}" for p in t.cfg.snapshot_at)
        lines.append(f"  {t.name}: {t.cfg.total_tokens:,} tokens, {len(t.runs)} runs branch at {points}")
    saved = 1 - f["tokens_trained"] / f["tokens_independent"] if f["tokens_independent"] else 0
    lines.append(f"tokens to train {f['tokens_trained']:,} vs {f['tokens_independent']:,} as independent runs "
                 f"({saved:.0%} saved)")
    if rates:
        seconds = sum(tokens / rates[key] for key, tokens in left.items())
        lines.append(f"ETA {seconds / 3600:.2f} h of training for what is left, at "
                     + ", ".join(f"{v:,.0f}" for v in rates.values()) + " tokens/s (measured, per trunk config)")
    return "\n".join(lines)


def parse_shard(text: str) -> Tuple[int, int]:
    try:
        i, n = map(int, text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: use i/n, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_qat.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="sweep YAML file")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory (rerun to resume)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its measured ETA, train nothing")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="run shard i of n (whole trunks per shard)")
    parser.add_argument("--results-dir", type=Path, help="where results.jsonl and sweep.json live (default: --out); "
                        "runs recorded there are not trained again, so a sweep resumes from its committed results alone")
    args = parser.parse_args(argv)
    group = distributed.world()
    if group.size() > 1 and args.shard != (0, 1):
        parser.exit(2, "error: --shard and mlx.launch both split the sweep; use one of them\n")
    shard_spec = (group.rank(), group.size()) if group.size() > 1 else args.shard
    writer = distributed.is_writer(group)
    open_sweep = partial(Sweep, args.config, args.out, shard_spec, args.results_dir)
    try:  # every step is taken together: a rank that fails stops them all, none is left waiting
        first = distributed.together(group, lambda: open_sweep() if writer else None)  # rank 0 prepares the data
        sweep = distributed.together(group, lambda: first or open_sweep())
        done = sweep.finished()
        left = tokens_left(sweep, done)
        configs = {trunk_key(r.cfg): r.cfg for r in sweep.runs}
        rates = distributed.together(group, lambda: {k: measure_rate(replace(configs[k], qat_fraction=0.0)) for k in left})
        print(format_plan(sweep, done, left, rates))
        if args.dry_run:
            return
        figures = distributed.together(group, run_sweep, sweep)
    except (SweepError, ValueError, FileNotFoundError, StartError, DivergenceError, checkpoint.CheckpointError,
            distributed.RankError) as e:
        parser.exit(2, f"error: {e}\n")
    if group.size() > 1 and writer:  # every rank is done: `together` waited for them
        print(f"merged the {group.size()} ranks' results into {merge_results(sweep.results_path.parent)}")
    print(f"finished {figures['runs_finished']}/{figures['runs_total']} runs; trained {figures['tokens_trained']:,} "
          f"tokens vs {figures['tokens_independent']:,} independently; {figures['wall_seconds'] / 3600:.2f} h; "
          f"results in {sweep.results_path}")


if __name__ == "__main__":
    main()
