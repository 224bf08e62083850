"""Conditioning encoders of SD v1: the CLIP ViT-L/14 text encoder (`FrozenCLIPEmbedder`).

The text model is built from a config with random weights; its weights come from the SD / InstructPix2Pix
checkpoint (``cond_stage_model.transformer.text_model.*``), never from a model hub.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from ldm.modules.encoders.tokenizer import check_tokenizer, load_clip_tokenizer
from ldm.util import report_legacy_param


# The text half of openai/clip-vit-large-patch14, the text encoder of SD v1 and InstructPix2Pix. The special ids
# are those of the CLIP tokenizer; they only affect the pooled output, which this encoder does not use.
CLIP_VIT_L14_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}


def clip_text_config(overrides: Mapping[str, Any] | None = None) -> CLIPTextConfig:
    """The ViT-L/14 text config with `overrides`; an unknown key is an error (CLIPTextConfig would keep it)."""
    reference = CLIPTextConfig()
    unknown = sorted(key for key in overrides or {} if not hasattr(reference, key))
    if unknown:
        raise KeyError(f"text_config: unknown CLIPTextConfig field(s) {unknown}")
    return CLIPTextConfig(**{**CLIP_VIT_L14_TEXT_CONFIG, **(overrides or {})})


class CLIPTextTransformerLayout(nn.Module):
    """Holds the CLIP text transformer under `text_model`, the key layout of the released checkpoints.

    transformers < 5.6 nests the transformer in ``CLIPTextModel.text_model``; later versions flatten it. Either way
    the state dict here reads ``text_model.embeddings.*``, ``text_model.encoder.layers.N.*``,
    ``text_model.final_layer_norm.*``.
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        model = CLIPTextModel(config)
        self.text_model = getattr(model, "text_model", model)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> Any:
        """Run the text transformer on token ids (B, L); returns the HF output (last_hidden_state: (B, L, D))."""
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states)


class AbstractEncoder(nn.Module):
    """Base class of the conditioning encoders (CompVis interface: `encode`)."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """Encode a conditioning input."""
        raise NotImplementedError


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP ViT-L/14 text encoder of SD v1 (Radford et al. 2021): prompts → (B, 77, 768) token embeddings.

    Args:
        version: hub id of the CLIP model; names the tokenizer when `tokenizer` is not given. Weights are never
            downloaded: the text model is built from `CLIP_VIT_L14_TEXT_CONFIG` and loaded from the checkpoint.
        device: accepted for compatibility with CompVis configs and ignored: the module follows ``.to()`` (or
            Lightning), and tokens go to the device of its parameters.
        max_length: tokens per prompt (padded with EOS, truncated keeping EOS last).
        freeze: eval mode and no gradients (SD / InstructPix2Pix); ``False`` fine-tunes the encoder (DreamBooth).
        layer: ``"last"``: output of ``final_layer_norm`` (SD v1); ``"penultimate"``: output of the last-but-one
            encoder layer, without the final norm (``layer="hidden", layer_idx=-2`` of SD 2 / sgm).
        tokenizer: local tokenizer folder, hub id, or a tokenizer object; default `version`. See
            `ldm.modules.encoders.tokenizer.load_clip_tokenizer` for the offline fallbacks.
        text_config: overrides of the CLIPTextConfig fields (tests build a tiny model with it).
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device | None = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: Literal["last", "penultimate"] = "last",
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        text_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer={layer!r}: expected one of {self.LAYERS}")
        config = clip_text_config(text_config)
        if not 0 < max_length <= config.max_position_embeddings:
            raise ValueError(f"max_length={max_length} must be in [1, {config.max_position_embeddings}]")
        report_legacy_param("FrozenCLIPEmbedder", "device", device, "the module follows .to() / the trainer")
        self.max_length = max_length
        self.layer = layer
        self.frozen = False
        self.tokenizer = self._tokenizer_from(tokenizer if tokenizer is not None else version, max_length)
        self.transformer = CLIPTextTransformerLayout(config)
        if freeze:
            self.freeze()

    @staticmethod
    def _tokenizer_from(source: str | PreTrainedTokenizerBase, max_length: int) -> PreTrainedTokenizerBase:
        """Load (or check) the CLIP tokenizer named by `source`."""
        if isinstance(source, PreTrainedTokenizerBase):
            check_tokenizer(source, type(source).__name__)
            return source
        return load_clip_tokenizer(str(source), max_length=max_length)

    def freeze(self) -> None:
        """Eval mode and ``requires_grad=False`` for good; `train()` then keeps the encoder in eval mode."""
        self.frozen = True
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def train(self, mode: bool = True) -> FrozenCLIPEmbedder:
        """Set training mode, except that a frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Token ids (B, max_length): BOS, prompt, EOS, EOS padding; truncated keeping EOS last."""
        batch = self.tokenizer(
            [text] if isinstance(text, str) else list(text),
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return batch["input_ids"]

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """Embed prompts: (B,) strings → (B, max_length, hidden) token embeddings."""
        device = next(self.transformer.parameters()).device
        tokens = self.tokenize(text).to(device)  # (B, L)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "penultimate")
        if self.layer == "penultimate":
            return outputs.hidden_states[-2]  # (B, L, D)
        return outputs.last_hidden_state  # (B, L, D)

    def encode(self, text: str | Sequence[str]) -> torch.Tensor:
        """Same as `forward` (CompVis interface used by ``get_learned_conditioning``)."""
        return self(text)
