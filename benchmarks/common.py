"""What every benchmark does with its result: print it and, if asked, write it as JSON."""

import json
import os
import platform
import subprocess
from pathlib import Path


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"


def revision() -> str:
    """The project's git commit (with "+changes" when the tree differs from it), or "unknown"."""
    git = ["git", "-C", str(Path(__file__).parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.strip() + ("+changes" if dirty.strip() else "")


def qat_step(model, cfg, group=None, loss=None) -> tuple:
    """(optimizer, step) of `model`, converted in place to its QAT form, as a run trains
    it after its switch to QAT (the optimizer fresh, at the peak learning rate)."""
    from mlx_qat import step
    from mlx_qat.layers import quant_specs, to_qat

    to_qat(model, quant_specs(model, cfg.spec, cfg.embedding_spec))
    return step.build_step(model, cfg, group=group, loss=loss)


def emit(result: dict, path=None) -> None:
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
