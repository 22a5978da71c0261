"""What a run leaves behind: metrics.jsonl, summary.json and its table, and the loss plot."""

import json
from pathlib import Path
from typing import List, Optional, Tuple

from . import atomic

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"  # the run's config as resolved: what --resume without --config reads
SUMMARY = "summary.json"  # written last: its presence marks a run finished


class Metrics:
    """metrics.jsonl: one JSON record per report, appended and flushed as the run goes."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def log(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> List[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# What a low-rank run's summary says of its adapter (written to <out>/adapter beside the export).
ADAPTER_NOTE = ("the adapter alone, for mlx-lm's float base; mlx_lm.fuse onto a quantized base would re-quantize "
                "W0 + BA round-to-nearest on a grid the model never trained on, where model/ is packed on the grid it "
                "trained on")


def _event_loss(records: List[dict], event: str) -> Optional[float]:
    return next((r["val_loss"] for r in records if r.get("event") == event), None)


def summary(plan, records, final_loss, exported_loss, exported, train_seconds, cfg, peak_memory=None,
            segment: Optional[Tuple[int, float]] = None) -> dict:
    """The run's figures. `train_seconds` covers the whole run; `segment`, for a resumed one, is
    (the step its last process resumed at, that process's seconds). The rate is the median of
    the reports of every process: a resumed run's metrics hold its earlier ones.

    B is the QAT weight bits (the element bits, 4 or 8, in an FP mode), the B of S_total;
    bits_per_weight is what the export stores per quantized weight, its scales (and affine
    biases) included: affine B + 2·32/G with float32 scale and bias per group of G, FP modes
    B + 8/G (one 8-bit scale per group: mxfp4 4.25, nvfp4 4.5, mxfp8 8.25), averaged over the
    blocks and the embedding."""
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return {
        "pretrained": cfg.pretrained,
        "fine_tune_type": cfg.fine_tune_type,
        "loss": cfg.loss,
        "N": plan.n_params,
        "D_fp": plan.fp_tokens,
        "D_qat": plan.qat_tokens,
        "D_total": plan.total_tokens,
        "B": cfg.bits if plan.qat_steps else None,
        "group_size": cfg.group_size,
        "mode": cfg.mode,
        "fp_scale": cfg.fp_scale,
        "S_total": plan.s_total,
        "qat_fraction": plan.qat_fraction,
        "schedule": cfg.schedule,
        "fp_val_loss": _event_loss(records, "end_fp"),
        "final_val_loss": final_loss,
        "exported_val_loss": exported_loss,
        "bits_per_weight": exported.bits_per_weight,
        "size_bytes": exported.size_bytes,
        "train_seconds": train_seconds,
        "resumed_at_step": segment[0] if segment else None,
        "segment_seconds": segment[1] if segment else None,
        "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
        "peak_memory_bytes": peak_memory,  # mx.get_peak_memory() over the run, to the final validation
        "model": str(exported.path),
    }


def write_summary(out: Path, summary: dict) -> None:
    atomic.write_text(out / SUMMARY, json.dumps(summary, indent=2))


def read_summary(out: Path) -> Optional[dict]:
    """The summary of the finished run in `out`, or None if it has not finished."""
    path = Path(out) / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


# The baselines of a pretrained start (mlx_qat.baselines), shown where the summary has them.
BASELINE_ROWS = (("val loss, starting model", "reference_val_loss"), ("val loss, PTQ (round to nearest)", "ptq_val_loss"),
                 ("val loss, DWQ", "dwq_val_loss"))


def format_summary(s: dict) -> str:
    def fmt(v, spec=""):
        return "-" if v is None else format(v, spec)

    start = [("started from", s["pretrained"])] if s.get("pretrained") else []
    if s.get("loss") == "distill":
        start.append(("training loss", "distillation from the starting model"))
    if s.get("fine_tune_type") == "lora":
        start.append(("fine-tuning", "low-rank QAT (base frozen; adapters and scales trained)"))
    baselines = [(label, fmt(s[k], ".4f")) for label, k in BASELINE_ROWS if k in s]
    if s.get("ptq_note"):
        baselines.append(("", s["ptq_note"]))
    peak = s.get("peak_memory_bytes")
    wall = f"{s['train_seconds']:.1f} s"
    if s.get("resumed_at_step") is not None:  # .get: a summary from before resumes were told apart
        wall += f" (resumed at step {s['resumed_at_step']:,}: {s['segment_seconds']:.1f} s since)"
    rows = start + [
        ("params N", f"{s['N']:,}"),
        ("D_fp / D_qat", f"{s['D_fp']:,} / {s['D_qat']:,} tokens"),
        ("bits B", fmt(s["B"]) + (f" ({s['mode']})" if s["B"] and s.get("mode", "affine") != "affine" else "")),
        ("S_total", f"{s['S_total']:.1f} tokens per parameter byte"),
        ("QAT fraction f", f"{s['qat_fraction']:.3f} ({s['schedule']})"),
        ("val loss, end of FP", fmt(s["fp_val_loss"], ".4f")),
        ("val loss, end of QAT", fmt(s["final_val_loss"], ".4f") if s["B"] else "-"),
        ("val loss, exported", fmt(s["exported_val_loss"], ".4f")),
        *baselines,
        ("bits per weight", f"{s['bits_per_weight']:.3f}"),
        ("size on disk", f"{s['size_bytes'] / 2**20:.2f} MiB"),
        ("wall time", wall),
        ("tokens/s", fmt(s["tokens_per_s"], ",.0f")),
        ("peak memory", "-" if peak is None else f"{peak / 2**20:,.1f} MiB"),
        ("model", s["model"]),
        *([("adapter", s["adapter"]), ("", s["adapter_note"])] if s.get("adapter") else []),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot(records: List[dict], switch_tokens: Optional[int], path: Path) -> None:
    """Train and validation loss over tokens, with the FP -> QAT switch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    if switch_tokens is not None:
        ax.axvline(switch_tokens, color="k", linestyle="--", label="FP → QAT")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
