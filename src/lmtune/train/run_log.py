"""What a run records as it goes: logs/train_log.jsonl, TensorBoard, loss_curve.png.

Only the main process writes. The plot is rewritten at most every 5 s (and at the end), atomically.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class RunLog:
    def __init__(self, work_dir: Path, enabled: bool = True):
        self.work_dir = Path(work_dir)
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.last_plot = 0.0

    def open(self) -> None:
        if not self.enabled:
            return
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.file = open(logs / "train_log.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(logs / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        """One JSON line; scalar fields of a step record also go to TensorBoard as train/<key>,
        those of a validation record (val_loss, val_ppl) as val/<name>."""
        if self.file is None:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.tb is not None and "loss" in record:
            for key, value in record.items():
                if key not in ("time", "step", "epoch", "tokens_seen") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
        elif self.tb is not None and "val_loss" in record:
            for key in ("val_loss", "val_ppl"):
                self.tb.add_scalar(f"val/{key[4:]}", record[key], record["step"])

    def plot(self, history: list, metrics: dict | None = None, force: bool = False) -> None:
        """Loss curve PNG, with the validation loss (metrics["val_loss"]) on the same axes, plus
        the objective's other metrics in a second panel when it logs any."""
        if self.file is None or not history or (not force and time.time() - self.last_plot <= 5):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metrics = dict(metrics or {})
        val = metrics.pop("val_loss", None)
        panels = 2 if metrics else 1
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.5), dpi=100, squeeze=False)
        steps, losses = zip(*history)
        ax = axes[0][0]
        ax.plot(steps, losses, lw=1.2, label="training")
        if val:
            ax.plot(*zip(*val), "o-", lw=1.2, ms=3, label="validation")
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training and validation loss" if val else "training loss")
        ax.grid(alpha=0.3)
        if metrics:
            ax = axes[0][1]
            for name, points in metrics.items():
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, lw=1.2, label=name)
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.work_dir / ".loss_curve.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.work_dir / "loss_curve.png")
        self.last_plot = time.time()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
