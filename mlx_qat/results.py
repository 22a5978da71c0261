"""Sweep results as the law's fit reads them: one record per run, in JSON-lines files or sweep
directories (their results.jsonl and its shards' results-i-of-n.jsonl). numpy only.

A record needs N, D_fp, D_qat, B (absent or null for FP-only runs) and final_val_loss. A run of
the separate schedule also measured a full-precision model at its switch: trained on D_fp tokens
with its own cooldown, the same as an FP-only run of D_fp tokens. With `fp_anchors` those losses
(`fp_val_loss`) are read as FP-only observations too, one per (N, D_fp): they pin the law's
Chinchilla part down with FP data, as the paper regularises its fit with the FP loss.
"""

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional

import numpy as np

REQUIRED = ("N", "D_fp", "D_qat", "final_val_loss")


class FitError(ValueError):
    """Results that cannot be read or fitted, with what to do about it."""


@dataclass
class Runs:
    """Sweep results as arrays (B is NaN for FP-only runs). `budget` is the D_total of the run an
    observation comes from (an FP anchor's run trained more than its D_fp); `anchor` marks the
    FP losses read at a separate run's switch."""

    n: np.ndarray
    d_fp: np.ndarray
    d_qat: np.ndarray
    bits: np.ndarray
    loss: np.ndarray
    budget: Optional[np.ndarray] = None
    anchor: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.budget is None:
            self.budget = self.d_fp + self.d_qat
        if self.anchor is None:
            self.anchor = np.zeros(len(self.loss), dtype=bool)

    def __len__(self):
        return len(self.loss)

    @property
    def is_qat(self) -> np.ndarray:
        return np.isfinite(self.bits)

    def where(self, keep: np.ndarray) -> "Runs":
        """The observations selected by the boolean mask `keep`."""
        return Runs(*(getattr(self, f.name)[keep] for f in fields(self)))


def bits_label(b: float) -> str:
    """How a run's bits are shown and grouped: "fp" for an FP-only run (B is NaN)."""
    return "fp" if not np.isfinite(b) else f"{b:g}"


def bits_order(label: str) -> float:
    """The sort key of a bits label: by width, FP last."""
    return math.inf if label == "fp" else float(label)


SHARD_RESULTS = re.compile(r"results-\d+-of-\d+\.jsonl")  # what each shard of a sweep writes


def shard_files(directory: Path) -> List[Path]:
    """A sweep directory's results.jsonl and its shards' results-i-of-n.jsonl (none if it has none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name == "results.jsonl" or SHARD_RESULTS.fullmatch(p.name))


def results_files(path: Path) -> List[Path]:
    """A results file as given; a sweep directory as its results.jsonl and shard results."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = shard_files(path)
    if not files:
        raise FitError(f"{path} is a directory without results.jsonl; pass a sweep directory "
                       "(python -m mlx_qat.sweep --out DIR) or the results file itself")
    return files


def read_results(*paths: Path, schedule: Optional[str] = None, fp_anchors: bool = False) -> Runs:
    """Read and check the results of one or more files or sweep directories (see results_files).
    With `schedule`, the QAT runs of that schedule only (or with none recorded; an FP-only run
    has no schedule to speak of); with `fp_anchors`, the FP losses at the switch of the
    separate-schedule runs too, whatever `schedule` is (once per (N, D_fp), and not where an
    FP-only run of that (N, D) is recorded)."""
    files = list(dict.fromkeys(f.resolve() for path in paths for f in results_files(path)))  # each file once
    records = [r for f in files for r in _read_records(f)]
    modes = sorted({mode for _, _, _, b, *_, mode in records if np.isfinite(b)})
    if len(modes) > 1:
        raise FitError(f"{', '.join(map(str, paths))} mix the quantization modes {', '.join(modes)}, which the law does "
                       "not tell apart; fit the results of one mode (and FP scale) at a time")
    rows = [(n, d_fp, d_qat, b, loss, d_fp + d_qat, False) for n, d_fp, d_qat, b, loss, _, kind, _ in records
            if schedule is None or not np.isfinite(b) or kind in (None, schedule)]
    if not any(np.isfinite(row[3]) for row in rows) and schedule is not None:
        rows = []
    if rows and fp_anchors:
        seen = {(n, d_fp + d_qat) for n, d_fp, d_qat, b, *_ in records if not np.isfinite(b)}
        for n, d_fp, d_qat, b, _, fp_loss, *_ in records:
            if fp_loss is not None and (n, d_fp) not in seen:
                seen.add((n, d_fp))
                rows.append((n, d_fp, 0.0, np.nan, fp_loss, d_fp + d_qat, True))
    if not rows:
        raise FitError(f"{', '.join(map(str, paths))} holds no results" + (f" of schedule {schedule}" if schedule else ""))
    return Runs(*map(np.array, zip(*rows)))


def _read_records(path: Path) -> List[tuple]:
    """(N, D_fp, D_qat, B, loss, FP loss at a separate run's switch or None, schedule or None,
    quantization mode) per record; every problem names the line and the fix."""
    if not path.exists():
        raise FitError(f"{path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FitError(f"{path}:{i} is not JSON ({e})") from e
        if not isinstance(record, dict):
            raise FitError(f"{path}:{i} is not a JSON object; each line holds one run's record")
        missing = [k for k in REQUIRED if record.get(k) is None]
        if missing:
            raise FitError(f"{path}:{i} lacks {', '.join(missing)}; each run needs {', '.join(REQUIRED)} (and B for QAT runs)")
        b = record.get("B")
        values = [record[k] for k in REQUIRED]
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) for v in values):
            raise FitError(f"{path}:{i}: N, D_fp, D_qat and final_val_loss must be finite numbers")
        n, d_fp, d_qat, loss = map(float, values)
        qat = b is not None and d_qat > 0
        if n <= 0 or loss <= 0 or d_fp < 0 or d_qat < 0 or d_fp + d_qat <= 0:
            raise FitError(f"{path}:{i}: N, final_val_loss and D_fp + D_qat must be positive, D_fp and D_qat non-negative")
        if qat and d_fp <= 0:
            raise FitError(f"{path}:{i}: a QAT run with D_fp = 0 (QAT from scratch) puts the law's S_fp at 0, "
                           "where it is unbounded; leave such runs out")
        if qat and not (isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0):
            raise FitError(f"{path}:{i}: B must be a positive number of bits, or null for FP-only runs")
        fp_loss = record.get("fp_val_loss") if qat and record.get("schedule") == "separate" else None
        if fp_loss is not None and not (isinstance(fp_loss, (int, float)) and math.isfinite(fp_loss) and fp_loss > 0):
            raise FitError(f"{path}:{i}: fp_val_loss must be a positive number or null")
        mode = record.get("mode") or (record.get("config") or {}).get("mode") or "affine"
        if mode != "affine":  # learned and derived scales are different quantizers to the law
            mode += f" ({record.get('fp_scale') or (record.get('config') or {}).get('fp_scale') or 'derived'} scales)"
        rows.append((n, d_fp, d_qat, float(b) if qat else np.nan, loss, fp_loss, record.get("schedule"), mode))
    return rows


