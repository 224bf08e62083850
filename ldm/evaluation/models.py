"""The evaluation encoders: DINO ViT-S/16 (CLS token) and CLIP ViT-B/32 (image and text embeddings).

Each loads from a hub id (the local hub cache first, the network only when allowed) or a local folder written by
``save_pretrained`` / ``huggingface-cli download``. A model that cannot be had is a `MissingFileError` saying how
to fetch it and which option points at a folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ldm.errors import MissingFileError, UsageError
from ldm.evaluation.preprocessing import CLIP_TRANSFORM, DINO_TRANSFORM, preprocess

logger = logging.getLogger(__name__)

DINO_ID = "facebook/dino-vits16"
CLIP_ID = "openai/clip-vit-base-patch32"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _is_folder_spec(source: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; an existing folder, an absolute or dotted path is a folder."""
    return (Path(source).expanduser().is_dir() or os.path.isabs(source) or source.startswith((".", "~"))
            or source.count("/") > 1)


def _fetch_hint(source: str, option: str, default_id: str) -> str:
    hub_id = default_id if _is_folder_spec(source) else source
    folder = f"models/{hub_id.split('/')[-1]}"
    return (f"fetch it on a machine with network access with `huggingface-cli download {hub_id} --local-dir {folder}` "
            f"and point {option} at that folder ({option} {folder})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _complete(loaded: tuple[Any, dict], cls: Any, source: str, option: str) -> Any:
    """The model of ``from_pretrained(..., output_loading_info=True)``; refuse weights that do not fill it.

    transformers fills missing weights with random ones and only logs it: a CLIP folder given as DINO would
    "load" and score noise.
    """
    model, info = loaded
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
        raise UsageError(f"{option} {source}: its weights do not fit a {cls.__name__} ({len(missing)} missing, "
                         f"e.g. {shown}); is it the right model?")
    return model


def load_pretrained(cls: Any, source: str, option: str, default_id: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source)`` with every weight loaded; a model that cannot be had is a `MissingFileError`.

    ``option`` (e.g. ``--dino``) and ``default_id`` (the hub id to suggest for a folder) only shape the messages.
    """
    kwargs["output_loading_info"] = True
    if _is_folder_spec(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise MissingFileError(f"{option} {source}: no such folder; {_fetch_hint(source, option, default_id)}")
        if not (folder / "config.json").is_file():
            raise UsageError(f"{option} {source}: no config.json in this folder (not a transformers model folder); "
                             f"{_fetch_hint(source, option, default_id)}")
        try:
            loaded = cls.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError) as err:
            raise UsageError(f"{option} {source}: cannot load a {cls.__name__} from this folder "
                             f"({_first_line(err)})") from None
        return _complete(loaded, cls, source, option)
    try:  # the local hub cache first: an unreachable hub would retry every file for minutes
        return _complete(cls.from_pretrained(source, local_files_only=True, **kwargs), cls, source, option)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise MissingFileError(f"{option} {source}: not in the local hub cache and HF_HUB_OFFLINE is set; "
                                   f"{_fetch_hint(source, option, default_id)}") from None
    try:
        loaded = cls.from_pretrained(source, **kwargs)
    except OSError as err:
        raise MissingFileError(f"{option} {source}: cannot be loaded ({_first_line(err)}); "
                               f"{_fetch_hint(source, option, default_id)}") from None
    return _complete(loaded, cls, source, option)


def describe(model: Any) -> str:
    """For the report: the architecture numbers of a loaded encoder."""
    config = getattr(model.config, "vision_config", model.config)
    return (f"{model.config.model_type}, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"patch {config.patch_size}, image {config.image_size}")


@dataclass
class DinoEncoder:
    """DINO ViT: the embedding of an image is the CLS token of the last hidden state (after the final norm)."""

    model: Any
    source: str
    device: torch.device

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """(N, D) embeddings, float32 on the CPU."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess(images[start : start + batch_size], DINO_TRANSFORM).to(self.device)
            out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.hidden_size)


@dataclass
class ClipEncoder:
    """CLIP: projected image embeddings (CLIP-I) and projected text embeddings (CLIP-T) of one model."""

    model: Any
    tokenizer: Any
    source: str
    device: torch.device

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """(N, P) image embeddings (visual projection of the pooled CLS token), float32 on the CPU."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess(images[start : start + batch_size], CLIP_TRANSFORM).to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, P) text embeddings (text projection of the EOS token), float32 on the CPU."""
        if not texts:
            return torch.empty(0, self.model.config.projection_dim)
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return self.model.text_projection(pooled).float().cpu()


def _clip_tokenizer(source: str, option: str, default_id: str) -> Any:
    """The model folder's tokenizer when it has one; otherwise CLIP's BPE vocabulary (shared by all OpenAI CLIPs)."""
    from ldm.modules.encoders.tokenizer import build_clip_tokenizer, load_clip_tokenizer

    folder = Path(source).expanduser()
    if _is_folder_spec(source):
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return load_clip_tokenizer(str(folder))
        logger.info("%s %s holds no tokenizer: using CLIP's BPE vocabulary", option, source)
        try:
            return build_clip_tokenizer()
        except FileNotFoundError as err:
            raise MissingFileError(f"{option} {source}: the folder has no tokenizer files and {err}") from None
    try:
        return load_clip_tokenizer(source)
    except (OSError, ValueError) as err:
        hint = _fetch_hint(source, option, default_id)
        raise MissingFileError(f"{option} {source}: no CLIP tokenizer ({err}); {hint}") from None


def load_dino(source: str = DINO_ID, device: torch.device | str = "cpu", option: str = "--dino") -> DinoEncoder:
    """DINO ViT from a hub id or a folder, in eval mode on ``device``."""
    from transformers import ViTModel

    model = load_pretrained(ViTModel, source, option, DINO_ID, add_pooling_layer=False)
    device = torch.device(device)
    return DinoEncoder(model.eval().to(device), source, device)


def load_clip(source: str = CLIP_ID, device: torch.device | str = "cpu", option: str = "--clip") -> ClipEncoder:
    """CLIP (vision and text towers) and its tokenizer from a hub id or a folder, in eval mode on ``device``."""
    from transformers import CLIPModel

    model = load_pretrained(CLIPModel, source, option, CLIP_ID)
    device = torch.device(device)
    tokenizer = _clip_tokenizer(source, option, CLIP_ID)
    return ClipEncoder(model.eval().to(device), tokenizer, source, device)


def random_encoders(seed: int = 0, device: torch.device | str = "cpu") -> tuple[DinoEncoder, ClipEncoder]:
    """Small DINO-shaped and CLIP-shaped encoders with random weights and CLIP's real tokenizer.

    For showing the evaluation pipeline where the real models cannot be had (offline demos): the numbers they give
    measure nothing about the images and must be reported with that caveat.
    """
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from ldm.modules.encoders.tokenizer import build_clip_tokenizer

    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        dino = ViTModel(ViTConfig(**layers, image_size=224, patch_size=16), add_pooling_layer=False)
        text = {**layers, "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
                "eos_token_id": 49407, "pad_token_id": 49407}
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**layers, "image_size": 224, "patch_size": 32},
                                    projection_dim=16))
    source = f"random weights (seed {seed})"
    return (DinoEncoder(dino.eval().to(device), source, device),
            ClipEncoder(clip.eval().to(device), build_clip_tokenizer(), source, device))
