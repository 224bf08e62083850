#!/usr/bin/env python
"""Evaluate personalized edits: subject fidelity (DINO, CLIP-I), text alignment (CLIP-T), background preservation.

    python scripts/evaluate.py --edits outputs/edited --sources photos/wolves --references data/my_dog/photos \
        --masks masks/ --out eval/
    # several checkpoints: one --edits per run (LABEL=PATH names it; a number in the label is its step)
    python scripts/evaluate.py --edits step500=out/500 --edits step1000=out/1000 --references ... --out eval/

Prompts come from the PNG metadata edit_cli.py writes (else --prompt). Writes ``results.csv`` (one line per edit),
``report.md`` (summary per run and the protocol) and ``plots/`` (a distribution per metric; a curve per metric
when several runs are given). DINO and CLIP load from hub ids or local folders (--dino / --clip).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.cli import HelpFormatter, run_cli  # noqa: E402
from ldm.errors import UsageError  # noqa: E402
from ldm.evaluation.models import CLIP_ID, DINO_ID  # noqa: E402

logger = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--edits", action="append", required=True, metavar="[LABEL=]PATH",
                   help="edited images (file, folder or quoted glob); repeat for several runs or checkpoints")
    p.add_argument("--sources", help="folder of the images the edits were made from (background metrics)")
    p.add_argument("--references", help="folder of the subject's reference photos (subject fidelity)")
    p.add_argument("--masks", help="folder of subject masks (white = subject), named like the edits or the sources")
    p.add_argument("--boxes", help="JSON {name: [left, top, right, bottom]} subject boxes in the edits' pixels")
    p.add_argument("--prompt", help="the instruction of edits whose PNG metadata has none")
    p.add_argument("--caption", help="target caption for CLIP-T (default: derived from each instruction)")
    p.add_argument("--identifier", default="sks", help="the subject's identifier token, removed from target captions")
    p.add_argument("--dino", default=DINO_ID, help="DINO ViT-S/16: hub id or local folder")
    p.add_argument("--clip", default=CLIP_ID, help="CLIP ViT-B/32: hub id or local folder")
    p.add_argument("--out", required=True, help="output folder (results.csv, report.md, plots/)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.masks and args.boxes:
        p.error("give --masks or --boxes, not both")
    return args


def run(args: argparse.Namespace) -> int:
    from ldm.editing import resolve_device
    from ldm.evaluation.inputs import collect_run, load_references, load_sample, parse_run, read_boxes, step_of
    from ldm.evaluation.models import describe, load_clip, load_dino
    from ldm.evaluation.preprocessing import CLIP_TRANSFORM, DINO_TRANSFORM
    from ldm.evaluation.report import plot_all, write_csv, write_report
    from ldm.evaluation.scoring import EditScorer, summarize

    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    boxes = read_boxes(args.boxes)
    runs = []
    for spec in args.edits:
        label, path = parse_run(spec)
        if any(run["label"] == label for run in runs):
            raise UsageError(f"--edits {spec}: a second run named {label!r}; name runs with LABEL=PATH")
        records = collect_run(label, path, args.sources, args.masks, boxes, args.prompt, args.caption, args.identifier)
        runs.append({"label": label, "records": records, "step": step_of(label, records[0].metadata if records else {})})
    if not any(run["records"] for run in runs):
        raise UsageError("no edited images to evaluate (only sweep grids?)")
    references = load_references(args.references) if args.references else []
    if not references:
        logger.warning("no --references: subject fidelity (dino_subject, clip_i_subject) is not computed")

    device = resolve_device(args.device)
    dino, clip = load_dino(args.dino, device), load_clip(args.clip, device)
    scorer = EditScorer(dino, clip, args.batch_size)
    reference_embeddings = scorer.references(references)
    rows = []
    for run in runs:
        samples = [load_sample(record) for record in run["records"]]
        scores = scorer.score(samples, reference_embeddings)
        run_rows = [{"run": run["label"], "step": run["step"], "edit": str(record.path),
                     "source": str(record.source) if record.source else "", "region": record.region,
                     "instruction": record.instruction or "", "caption": record.caption,
                     "notes": "; ".join(record.notes), **score}
                    for record, score in zip(run["records"], scores)]
        run.update(count=len(run_rows), summary=summarize(run_rows))
        rows += run_rows
        logger.info("%s: %d edits scored", run["label"], len(run_rows))

    out = Path(args.out)
    write_csv(rows, out / "results.csv")
    plots, plots_note = plot_all(rows, runs, out / "plots")
    settings = {
        "edits": ", ".join(args.edits), "sources": args.sources, "references": args.references,
        "reference_count": len(references), "masks": args.masks, "boxes": args.boxes, "identifier": args.identifier,
        "dino": args.dino, "dino_arch": describe(dino.model), "dino_preprocessing": DINO_TRANSFORM.describe(),
        "clip": args.clip, "clip_arch": describe(clip.model), "clip_preprocessing": CLIP_TRANSFORM.describe(),
    }
    report = write_report(out / "report.md", runs, settings, plots, plots_note)
    print(out / "results.csv")
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
