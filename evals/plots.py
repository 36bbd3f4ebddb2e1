"""PNG figures of an evaluation: retrieval, anchor shift, imputation error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data_pipeline.atomic import atomic_save_figure  # noqa: E402


def plot_eval(results: dict[str, Any], path: str | Path) -> Path:
    panels = [p for p in ("retrieval", "anchor_shift", "imputation_error") if results.get(p)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "retrieval":
            pairs = list(results["retrieval"])
            ax.bar(pairs, [results["retrieval"][p]["R@1"] for p in pairs], color="tab:blue")
            ax.set_title("retrieval R@1 (complete test instances)")
            ax.set_ylim(0, 1)
        elif panel == "anchor_shift":
            patterns = list(results["anchor_shift"])
            xs = range(len(patterns))
            ax.bar(
                [x - 0.2 for x in xs],
                [results["anchor_shift"][p]["observed_only"] for p in patterns],
                width=0.4,
                label="observed only (local anchor)",
                color="tab:orange",
            )
            if all("calibrated" in results["anchor_shift"][p] for p in patterns):
                ax.bar(
                    [x + 0.2 for x in xs],
                    [results["anchor_shift"][p]["calibrated"] for p in patterns],
                    width=0.4,
                    label="calibrated",
                    color="tab:green",
                )
            ax.set_xticks(list(xs), patterns)
            ax.set_title("anchor shift |u - u_O| by observed pattern")
            ax.legend()
        else:
            methods = list(results["imputation_error"])
            modalities = list(results["imputation_error"][methods[0]])
            width = 0.8 / len(methods)
            for i, method in enumerate(methods):
                ax.bar(
                    [x + i * width for x in range(len(modalities))],
                    [results["imputation_error"][method][m]["cosine"] for m in modalities],
                    width=width,
                    label=method,
                )
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(modalities))], modalities)
            ax.set_title("imputation error (cosine distance) by hidden modality")
            ax.legend()
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    path = Path(path)
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
