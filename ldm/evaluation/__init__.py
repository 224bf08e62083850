"""Evaluation of personalized edits: subject fidelity, text alignment and background preservation.

``preprocessing`` (the encoders' published input transforms, crops), ``models`` (DINO / CLIP loading),
``metrics`` (cosine, masked L1 / PSNR / SSIM, target captions), ``scoring`` (per-edit metrics), ``inputs``
(edits, sources, masks, PNG metadata) and ``report`` (CSV, report.md, plots). ``scripts/evaluate.py`` is the CLI.
"""
