"""Write an evaluation: per-image CSV, ``report.md`` (summary per run and the protocol), and plots.

Plots need matplotlib (the optional ``eval`` extra: ``pip install -e .[eval]``); without it they are skipped with a
warning and the report says so. Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from ldm.evaluation.scoring import HIGHER_IS_BETTER, METRICS
from ldm.fileio import atomic_path

logger = logging.getLogger(__name__)

ROW_FIELDS = ("run", "step", "edit", "source", "region", "instruction", "caption", "notes")
METRIC_TITLES = {
    "dino_subject": "DINO subject similarity",
    "clip_i_subject": "CLIP-I subject similarity",
    "clip_t": "CLIP-T (edit vs target caption)",
    "bg_l1": "background L1",
    "bg_psnr": "background PSNR (dB)",
    "bg_ssim": "background SSIM",
    "bg_dino": "background DINO similarity",
    "bg_clip_i": "background CLIP-I similarity",
}


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One line per edited image: identification columns, then every metric (empty where it does not apply)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROW_FIELDS) + list(METRICS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(row.get(key)) for key in writer.fieldnames})
    return path


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def summary_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown table: one row per run, ``mean ± std (n)`` per metric that any run has."""
    present = [m for m in METRICS if any(m in run["summary"] for run in runs)]
    if not present:
        return ["No metric could be computed (see the notes in results.csv)."]
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in present}
    lines = ["| run | step | images | " + " | ".join(f"{m} {arrows[m]}" for m in present) + " |",
             "|---|---|---|" + "---|" * len(present)]
    for run in runs:
        cells = []
        for metric in present:
            stats = run["summary"].get(metric)
            cells.append(f"{_fmt(stats['mean'])} ± {_fmt(stats['std'])} ({stats['n']})" if stats else "–")
        step = "" if run.get("step") is None else str(run["step"])
        lines.append(f"| {run['label']} | {step} | {run['count']} | " + " | ".join(cells) + " |")
    return lines


def write_report(path: Path, runs: Sequence[dict[str, Any]], settings: dict[str, Any], plots: list[Path],
                 plots_note: str | None) -> Path:
    """``report.md``: the summary table, then the protocol (models, preprocessing, metric definitions)."""
    lines = ["# Edit evaluation", "", f"{sum(r['count'] for r in runs)} edited images in {len(runs)} run(s); "
             "per-image values in `results.csv`. Values are mean ± std (number of images where the metric applies).",
             "", *summary_table(runs), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(path.parent).as_posix()})" for p in plots] + [""]
    elif plots_note:
        lines += ["## Plots", "", plots_note, ""]
    lines += [
        "## Protocol", "",
        f"- Edits: {settings['edits']}; sources: {settings['sources'] or '—'}; references: {settings['references']} "
        f"({settings['reference_count']} photos); masks: {settings['masks'] or '—'}; boxes: {settings['boxes'] or '—'}.",
        f"- DINO: `{settings['dino']}` ({settings['dino_arch']}); the embedding is the CLS token of the last hidden "
        f"state. Preprocessing: {settings['dino_preprocessing']} (the model's published `preprocessor_config.json`).",
        f"- CLIP: `{settings['clip']}` ({settings['clip_arch']}); image embedding = visual projection of the pooled "
        f"output, text embedding = text projection of the EOS token (77 tokens). Preprocessing: "
        f"{settings['clip_preprocessing']}.",
        "- Subject fidelity (DreamBooth): `dino_subject`, `clip_i_subject` = cosine similarity between the edited "
        "subject region (bounding box of the mask or box; the whole image without one) and each reference photo, "
        "averaged over the references.",
        f"- Text alignment: `clip_t` = cosine similarity between the whole edited image and the target caption: the "
        f"instruction's result with the identifier `{settings['identifier']}` removed (\"replace the wolf with a "
        f"{settings['identifier']} dog\" → \"a photo of a dog\"; \"make the square red\" → \"a photo of a red square\"; "
        "other instructions as they are). Raw cosine, not scaled.",
        "- Background preservation (DreamEditBench), on the pixels outside the mask or box, edit vs source: `bg_l1` "
        "(mean absolute error, pixels in [0, 1]); `bg_psnr` (dB, data range 1, capped at 100 dB for identical "
        "pixels); `bg_ssim` (kornia Gaussian SSIM, 11×11, σ 1.5, averaged over the window centres whose window lies "
        "outside the mask); `bg_dino` / `bg_clip_i` (cosine similarity of the two images with the mask blacked out). "
        "They need a source and a mask or box.",
        "- A source of another size is refitted with edit_cli's size rule at the recorded `resolution`, or resized "
        "to the edit (noted in results.csv); masks are resized to the edit with nearest neighbours.",
        "",
    ]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return path


def _matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def plot_all(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], folder: Path) -> tuple[list[Path], str | None]:
    """A distribution plot per metric (one histogram per run) and, with several runs, a curve per metric.

    Returns the written files and, when plots could not be drawn, why.
    """
    backend = _matplotlib()
    if backend is None:
        note = "Plots skipped: matplotlib is not installed (`pip install -e .[eval]`)."
        logger.warning(note)
        return [], note
    Figure, FigureCanvasAgg = backend
    written = []
    labels = [run["label"] for run in runs]
    for metric in METRICS:
        series = {label: [r[metric] for r in rows if r["run"] == label and not math.isnan(r[metric])] for label in labels}
        if not any(series.values()):
            continue
        figure = Figure(figsize=(5, 3.2))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        values = [v for vs in series.values() for v in vs]
        low, high = min(values), max(values)
        bins = 20 if high > low else 1
        for label, data in series.items():
            if data:
                axes.hist(data, bins=bins, range=(low, high) if high > low else (low - 0.5, low + 0.5), alpha=0.5,
                          label=f"{label} (n={len(data)})")
        axes.set_xlabel(METRIC_TITLES[metric])
        axes.set_ylabel("images")
        axes.legend(fontsize="small")
        figure.tight_layout()
        written.append(_save(figure, folder / f"{metric}_distribution.png"))
    if len(runs) > 1:
        numeric = all(run.get("step") is not None for run in runs)
        xs = [run["step"] for run in runs] if numeric else list(range(len(runs)))
        for metric in METRICS:
            points = [(x, run["summary"][metric]) for x, run in zip(xs, runs) if metric in run["summary"]]
            if len(points) < 2:
                continue
            figure = Figure(figsize=(5, 3.2))
            FigureCanvasAgg(figure)
            axes = figure.add_subplot()
            axes.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], yerr=[p[1]["std"] for p in points],
                          marker="o", capsize=3)
            if not numeric:
                axes.set_xticks(xs, labels, rotation=30, ha="right", fontsize="small")
            axes.set_xlabel("training step" if numeric else "run")
            axes.set_ylabel(METRIC_TITLES[metric])
            figure.tight_layout()
            written.append(_save(figure, folder / f"{metric}_by_run.png"))
    return written, None


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path
