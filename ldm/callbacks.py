"""Lightning callbacks and IO of the training harness (re-exported by ``main.py`` for config targets)."""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from ldm.checkpoint import read_checkpoint
from ldm.fileio import atomic_path
from ldm.util import ConfigError, report_legacy_param

logger = logging.getLogger(__name__)
EVAL_MODEL_KEYS = ("dino", "clip")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written atomically and read without running pickled code (`ldm.checkpoint`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path)


class SetupCallback(Callback):
    """Creates the run folders and saves the merged configs (rank 0); saves ``last.ckpt`` on Ctrl-C."""

    def __init__(self, resume: bool, now: str, logdir: str, ckptdir: str, cfgdir: str, config: Any, lightning_config: Any) -> None:
        super().__init__()
        self.resume, self.now = resume, now
        self.logdir, self.ckptdir, self.cfgdir = Path(logdir), Path(ckptdir), Path(cfgdir)
        self.config, self.lightning_config = config, lightning_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.global_rank != 0:
            return
        for folder in (self.logdir, self.ckptdir, self.cfgdir):
            folder.mkdir(parents=True, exist_ok=True)
        for suffix, config in (("project", self.config), ("lightning", OmegaConf.create({"lightning": self.lightning_config}))):
            with atomic_path(self.cfgdir / f"{self.now}-{suffix}.yaml") as tmp:
                OmegaConf.save(config, tmp)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.global_rank == 0:
            logger.warning("interrupted: saving %s", self.ckptdir / "last.ckpt")
            trainer.save_checkpoint(self.ckptdir / "last.ckpt", weights_only=False)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is always the final step, saved once.

    With ``max_steps`` not a multiple of ``every_n_train_steps``, ``last.ckpt`` is written at the final step, in the
    batch hook like the periodic checkpoints: at train end Lightning has already closed the epoch, and a run resumed
    from there would not continue the epoch where it stopped. Lightning's own train-end save of ``last`` is then
    skipped (it would land beside it as ``last-v1.ckpt``); runs bounded by epochs keep it.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        every = self._every_n_train_steps or 0
        if self.save_last and self._at_final_step(trainer) and (not every or trainer.global_step % every):
            self.last_model_path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
            trainer.save_checkpoint(self.last_model_path, weights_only=False)  # every rank calls it; rank 0 writes

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._at_final_step(trainer):
            super().on_train_end(trainer, pl_module)

    @staticmethod
    def _at_final_step(trainer: pl.Trainer) -> bool:
        return trainer.max_steps > 0 and trainer.global_step == trainer.max_steps


class ImageLogger(Callback):
    """Every ``batch_frequency`` steps, edit a few validation pairs with the current model and save a grid.

    Each grid row is ``input | current model's edit | target`` with its instruction, sampled with the inference
    guidance (``cfg_text``, ``cfg_image``, ``steps``) and the EMA weights when the model keeps them. Grids go to
    ``<logdir>/images/train/gs-<step>.png``. ``increase_log_steps`` also logs at steps 1, 2, 4, … below the frequency.

    ``eval_models`` (``{dino: hub id or folder, clip: hub id or folder}``, either may be left out; off by default)
    also scores those edits (`ldm.evaluation`) at every grid whose step is a multiple of ``eval_every`` (default:
    every grid) and logs ``val/dino_subject`` and ``val/clip_i_subject`` (the edit against the pairs' targets, i.e.
    the subject's photos) and ``val/clip_t`` (the edit against its instruction's target caption, the identifier
    removed: ``eval_identifier``, default the validation set's) to the run's loggers (``metrics.csv``). The models
    load when training starts; one that cannot be had stops the run with an error saying how to fetch it.
    CompVis's ``clamp``, ``rescale``, ``log_on_batch_idx`` and ``log_images_kwargs`` are accepted and reported as
    legacy parameters; bad values are `ConfigError`s.
    """

    def __init__(
        self,
        batch_frequency: int = 500,
        max_images: int = 4,
        clamp: bool = True,
        increase_log_steps: bool = True,
        rescale: bool = True,
        disabled: bool = False,
        log_on_batch_idx: bool = False,
        log_first_step: bool = False,
        log_images_kwargs: Mapping[str, Any] | None = None,
        steps: int = 20,
        cfg_text: float = 7.5,
        cfg_image: float = 1.5,
        sampler: str = "euler_ancestral",
        seed: int = 0,
        save_dir: str | None = None,
        eval_models: Mapping[str, str] | None = None,
        eval_every: int | None = None,
        eval_identifier: str | None = None,
    ) -> None:
        super().__init__()
        if batch_frequency < 1:
            raise ConfigError(f"ImageLogger: batch_frequency must be >= 1, got {batch_frequency}")
        unknown = sorted(set(eval_models or {}) - set(EVAL_MODEL_KEYS))
        if unknown:
            raise ConfigError(f"ImageLogger: eval_models has unknown key(s) {', '.join(unknown)} "
                              f"(accepted: {', '.join(EVAL_MODEL_KEYS)})")
        if eval_every is not None and eval_every < 1:
            raise ConfigError(f"ImageLogger: eval_every must be >= 1, got {eval_every}")
        for name, value, default in (("clamp", clamp, True), ("rescale", rescale, True),
                                     ("log_on_batch_idx", log_on_batch_idx, False),
                                     ("log_images_kwargs", log_images_kwargs, None)):
            report_legacy_param("ImageLogger", name, value, "the grid is input | edit | target at global steps",
                                default)
        self.eval_models = {k: str(v) for k, v in (eval_models or {}).items() if v}
        self.eval_every, self.eval_identifier = eval_every, eval_identifier
        self.scorer: Any = None
        self.batch_frequency, self.max_images, self.disabled = batch_frequency, max_images, disabled
        self.log_steps = {2**n for n in range(int(math.log2(batch_frequency)) + 1)} if increase_log_steps else set()
        self.log_first_step = log_first_step
        self.steps, self.cfg_text, self.cfg_image, self.sampler, self.seed = steps, cfg_text, cfg_image, sampler, seed
        self.save_dir = Path(save_dir) if save_dir else None
        self.logged: list[Path] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Load the evaluation models (rank 0, which alone logs) before the first step, so a missing one fails fast."""
        if self.eval_models and not self.disabled and trainer.is_global_zero and self.scorer is None:
            from ldm.evaluation.models import load_clip, load_dino
            from ldm.evaluation.scoring import EditScorer

            sources, device = self.eval_models, pl_module.device
            dino = load_dino(sources["dino"], device, "eval_models.dino") if "dino" in sources else None
            clip = load_clip(sources["clip"], device, "eval_models.clip") if "clip" in sources else None
            self.scorer = EditScorer(dino, clip)

    def _due(self, step: int) -> bool:
        return step > 0 and (step % self.batch_frequency == 0 or step in self.log_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.disabled and (self._due(step) or (self.log_first_step and step == 1)):
            self.log_grid(trainer, pl_module, batch, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        step = trainer.global_step
        if not self.disabled and step > 0 and not any(p.stem == f"gs-{step:06d}" for p in self.logged):
            self.log_grid(trainer, pl_module, None, step)

    def _pairs(self, trainer: pl.Trainer, batch: Any) -> list[dict[str, Any]]:
        """Up to ``max_images`` validation pairs (or the current training batch when there is no validation set)."""
        dataset = self._validation_set(trainer)
        if dataset is not None and len(dataset) > 0:
            return [dataset[i] for i in range(min(self.max_images, len(dataset)))]
        if batch is None:
            return []
        half = batch[0] if isinstance(batch, (list, tuple)) else batch
        count = min(self.max_images, len(half["caption"]))
        return [{"image": half["image"][i], "c_concat": half["c_concat"][i], "caption": half["caption"][i]} for i in range(count)]

    @rank_zero_only
    @torch.no_grad()
    def log_grid(self, trainer: pl.Trainer, pl_module: Any, batch: Any, step: int) -> Path | None:
        from ldm.data.transforms import tensor_to_image
        from ldm.editing import decode_to_images, edit_latents
        from ldm.visualization import labelled_grid

        pairs = self._pairs(trainer, batch)
        if not pairs:
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            inputs = torch.stack([p["c_concat"] for p in pairs]).to(pl_module.device)
            captions = [p["caption"] for p in pairs]
            n = len(pairs)
            with pl_module.ema_scope():
                latents = edit_latents(pl_module, inputs, captions, [self.cfg_text] * n, [self.cfg_image] * n,
                                       [self.seed + i for i in range(n)], steps=self.steps, sampler=self.sampler)
                edits = decode_to_images(pl_module, latents)
        finally:
            pl_module.train(was_training)
        if self.scorer is not None and (self.eval_every is None or step % self.eval_every == 0):
            self.log_scores(trainer, pairs, edits, step)
        cells, labels = [], []
        for pair, edit in zip(pairs, edits):
            cells += [tensor_to_image(pair["c_concat"]), tensor_to_image(edit), tensor_to_image(pair["image"])]
            labels += ["input", pair["caption"][:40], "target"]
        root = self.save_dir or Path(trainer.default_root_dir)
        path = root / "images" / "train" / f"gs-{step:06d}.png"
        with atomic_path(path) as tmp:
            labelled_grid(cells, 3, labels).save(tmp, format="PNG")
        self.logged.append(path)
        return path

    def log_scores(self, trainer: pl.Trainer, pairs: list[dict[str, Any]], edits: torch.Tensor, step: int) -> dict[str, float]:
        """Score the edits (`ldm.evaluation`) and log the means as ``val/<metric>`` to every logger of the run."""
        from ldm.data.transforms import tensor_to_image
        from ldm.evaluation.metrics import target_caption
        from ldm.evaluation.scoring import METRICS, EditSample, summarize

        identifier = self.eval_identifier or getattr(self._validation_set(trainer), "identifier", None) or "sks"
        references, seen = [], set()
        for pair in pairs:  # the targets are the subject's photos; repeated ones count once
            image = tensor_to_image(pair["image"])
            key = image.tobytes()
            if key not in seen:
                seen.add(key)
                references.append(image)
        samples = [EditSample(tensor_to_image(edit), target_caption(pair["caption"], identifier))
                   for pair, edit in zip(pairs, edits)]
        rows = self.scorer.score(samples, self.scorer.references(references))
        metrics = {f"val/{name}": stats["mean"] for name, stats in summarize(rows, METRICS).items()}
        for run_logger in trainer.loggers:
            run_logger.log_metrics(metrics, step=step)
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    @staticmethod
    def _validation_set(trainer: pl.Trainer) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        return getattr(datamodule, "datasets", {}).get("validation") if datamodule is not None else None


class _ResumingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, but a resumed run keeps the rows of the steps it already trained.

    Lightning deletes ``metrics.csv`` when the log dir exists. Here the file is kept; at the first save the rows
    from the resumed step on (logged after the checkpoint by the interrupted run, and about to be logged again)
    are dropped, so every step appears once.
    """

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir=log_dir)
        self._trim_pending = os.path.isfile(self.metrics_file_path)
        if self._trim_pending:
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])

    def _check_log_dir_exists(self) -> None:  # keep the previous rows (Lightning would delete them)
        return

    def save(self) -> None:
        if self._trim_pending and self.metrics:
            first = min(int(m["step"]) for m in self.metrics if "step" in m)
            with open(self.metrics_file_path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if not r.get("step") or int(r["step"]) < first]
            with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)
            self._trim_pending = False
        super().save()


class ResumingCSVLogger(CSVLogger):
    """`pytorch_lightning.loggers.CSVLogger` whose ``metrics.csv`` survives ``main.py -r`` (see the writer)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumingExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
