"""CLIP text encoder: offline tokenizer, checkpoint key layout, parity with diffusers' CLIPTextModel and open_clip."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.modules.encoders import tokenizer as tokenizer_module
from ldm.modules.encoders.modules import CLIP_VIT_L14_TEXT_CONFIG, FrozenCLIPEmbedder, clip_text_config
from ldm.modules.encoders.tokenizer import (
    build_clip_tokenizer,
    check_tokenizer,
    find_clip_bpe_file,
    load_clip_tokenizer,
    read_clip_bpe,
    save_clip_tokenizer,
)
from tests.reference import manifest_entries

POSITION_IDS = "transformer.text_model.embeddings.position_ids"
SKS_DOG_IDS = [49406, 320, 1125, 539, 320, 48136, 1929, 49407]
TINY_TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "projection_dim": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
}
PROMPTS = ["a photo of a sks dog", "replace the wolf with a sks dog in the snow, golden hour, 35mm photograph", ""]


@pytest.fixture(scope="module")
def clip_tokenizer() -> CLIPTokenizer:
    """The offline tokenizer; without open-clip-torch (the BPE file's home) this fails, naming the fix."""
    return build_clip_tokenizer()


def tiny_embedder(tokenizer: CLIPTokenizer, **kwargs) -> FrozenCLIPEmbedder:
    return FrozenCLIPEmbedder(tokenizer=tokenizer, text_config=TINY_TEXT_CONFIG, **kwargs)


# (a) tokenizer ------------------------------------------------------------------------------------------------


def test_tokenizer_ids_padding_and_vocab(clip_tokenizer: CLIPTokenizer) -> None:
    assert clip_tokenizer.vocab_size == len(clip_tokenizer) == 49408
    assert clip_tokenizer("a photo of a sks dog").input_ids == SKS_DOG_IDS
    tokens = tiny_embedder(clip_tokenizer).tokenize(["a photo of a sks dog"])
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    assert tokens[0, :8].tolist() == SKS_DOG_IDS
    assert (tokens[0, 8:] == 49407).all()


def test_truncation_keeps_eos_last(clip_tokenizer: CLIPTokenizer) -> None:
    tokens = tiny_embedder(clip_tokenizer).tokenize("dog " * 100)
    assert tokens.shape == (1, 77)
    assert tokens[0, 0] == 49406 and tokens[0, -1] == 49407
    assert (tokens[0, 1:-1] == 1929).all()


def test_vocab_and_ids_match_reference_simple_tokenizer(clip_tokenizer: CLIPTokenizer) -> None:
    """open_clip's SimpleTokenizer (OpenAI's algorithm, with ftfy/html cleaning) is the reference."""
    reference = _reference_simple_tokenizer()
    vocab, _ = read_clip_bpe(find_clip_bpe_file())
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert vocab == {renamed.get(token, token): index for token, index in reference.encoder.items()}
    # ASCII, accents and whitespace runs agree; text that needs ftfy/html fixes does not (see module docstring).
    for text in PROMPTS + ["Café naïve résumé", "  tabs\tand\nnewlines  ", "I'm 3 dogs' owner!!", "日本の犬"]:
        assert clip_tokenizer(text).input_ids[1:-1] == reference.encode(text), text


def _reference_simple_tokenizer() -> object:
    """open_clip/tokenizer.py loaded as a standalone module (importing the package would need torchvision)."""
    path = find_clip_bpe_file().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_open_clip_reference_tokenizer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module, ModuleType)
    return module.SimpleTokenizer(str(find_clip_bpe_file()))


def test_placeholder_tokenizer_is_refused(clip_tokenizer: CLIPTokenizer) -> None:
    placeholder = CLIPTokenizer()  # what transformers 5 returns when the hub is unreachable
    with pytest.raises(ValueError, match=r"'hub:some/id'.*vocab_size=2.*ldm\.modules\.encoders\.tokenizer --out"):
        check_tokenizer(placeholder, "hub:some/id")
    with pytest.raises(ValueError, match="vocab_size=2"):
        tiny_embedder(placeholder)


def test_offline_hub_id_falls_back_to_bpe_file(
    clip_tokenizer: CLIPTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ldm.modules.encoders.tokenizer"):
        tokenizer = load_clip_tokenizer("openai/not-a-cached-clip")
    assert tokenizer("a photo of a sks dog").input_ids == SKS_DOG_IDS
    assert "building the CLIP tokenizer from" in caplog.text


def test_offline_hub_id_without_bpe_file_is_a_clear_error(
    clip_tokenizer: CLIPTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "open_clip" else real_find_spec(name, *args)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps open-clip-torch==3\.3\.0"):
        find_clip_bpe_file()
    # HF_HUB_OFFLINE (conftest): the download returns the placeholder at once, which is refused.
    with pytest.raises(ValueError, match=r"'openai/not-a-cached-clip'.*vocab_size=2"):
        load_clip_tokenizer("openai/not-a-cached-clip")


def test_tokenizer_folder_round_trip_and_cli(clip_tokenizer: CLIPTokenizer, tmp_path: Path) -> None:
    folder = save_clip_tokenizer(tmp_path / "api")
    tokenizer_module.main(["--out", str(tmp_path / "cli"), "--bpe", str(find_clip_bpe_file())])
    for path in (folder, tmp_path / "cli"):
        embedder = tiny_embedder(str(path))
        assert embedder.tokenize("a photo of a sks dog")[0, :8].tolist() == SKS_DOG_IDS
        assert embedder.tokenizer.model_max_length == 77
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        load_clip_tokenizer(str(tmp_path / "missing-folder"))


# (b) state-dict layout ------------------------------------------------------------------------------------------


def test_full_size_keys_match_manifest(clip_tokenizer: CLIPTokenizer) -> None:
    prefix = "cond_stage_model."
    expected = [
        (entry["key"][len(prefix) :], entry["shape"])
        for entry in manifest_entries("ip2p", "text")
        if not entry["key"].endswith("position_ids")
    ]
    assert len(expected) == 196
    with torch.device("meta"):
        embedder = FrozenCLIPEmbedder()  # default tokenizer: offline, hence built from the BPE file
    actual = [(key, list(value.shape)) for key, value in embedder.state_dict().items()]
    assert actual == expected
    assert len(actual) == 196


def test_unknown_text_config_field_is_an_error() -> None:
    with pytest.raises(KeyError, match="hiden_size"):
        clip_text_config({"hiden_size": 32})


# (c) parity with diffusers ------------------------------------------------------------------------------------------


def _randomize(module: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (layer norms included) so that a misplaced tensor shows."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.2)


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_parity_with_diffusers_converted_clip(clip_tokenizer: CLIPTokenizer, tmp_path: Path, layer: str) -> None:
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    source = tiny_embedder(clip_tokenizer)
    _randomize(source)
    # An old-style checkpoint: original layout under `cond_stage_model.`, plus the position_ids of transformers<4.31.
    checkpoint = {"cond_stage_model." + key: value.clone() for key, value in source.state_dict().items()}
    checkpoint["cond_stage_model." + POSITION_IDS] = torch.arange(77).unsqueeze(0)
    clip_text_config(TINY_TEXT_CONFIG).save_pretrained(tmp_path / "text_encoder")
    oracle = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, dict(checkpoint), subfolder="text_encoder", config=str(tmp_path), local_files_only=True
    )
    # diffusers loads with strict=False: make sure every oracle tensor really came from the checkpoint.
    oracle_state = oracle.state_dict()
    assert len(oracle_state) == len(checkpoint) - 1
    for key, value in source.state_dict().items():
        torch.testing.assert_close(oracle_state[key.removeprefix("transformer.text_model.")], value, rtol=0, atol=0)

    # Our model from the same file: strip the prefix, drop position_ids (the checkpoint migration's job), strict.
    model = tiny_embedder(clip_tokenizer, layer=layer)
    state = {key.removeprefix("cond_stage_model."): value for key, value in checkpoint.items()}
    del state[POSITION_IDS]
    model.load_state_dict(state, strict=True)

    tokens = model.tokenize(PROMPTS)
    assert tokens.shape == (3, 77)
    with torch.no_grad():
        ours = model(PROMPTS)
        outputs = oracle(input_ids=tokens, output_hidden_states=True)
    reference = outputs.last_hidden_state if layer == "last" else outputs.hidden_states[-2]
    assert ours.shape == (3, 77, 32)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert not torch.allclose(ours[0], ours[1])  # different prompts, different embeddings
    torch.testing.assert_close(model.encode(PROMPTS), ours, rtol=0, atol=0)


# (c') parity with open_clip: an implementation that shares no code with transformers ----------------------------

OPEN_CLIP_ALIAS = "_open_clip_reference"
OPEN_CLIP_TINY = {"width": 32, "heads": 4, "layers": 3}  # mlp_ratio 4 (open_clip's default): intermediate 128
OURS_TINY = {"hidden_size": 32, "intermediate_size": 128, "projection_dim": 32, "num_hidden_layers": 3,
             "num_attention_heads": 4}


def _open_clip_module(name: str) -> ModuleType:
    """``open_clip.<name>`` imported from the installed package without running the package ``__init__``.

    The ``__init__`` imports torchvision and timm (image towers; not installed here, see setup.py). A private package
    name points at open_clip's folder, so its text-tower code runs unmodified. Its ``.utils`` imports torchvision at the
    top and is replaced by stubs that raise: the text tower does not call them, and a test fails if it ever does.
    """
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.origin, "open_clip absent: pip install --no-deps open-clip-torch==3.3.0"
    if OPEN_CLIP_ALIAS not in sys.modules:
        package = ModuleType(OPEN_CLIP_ALIAS)
        package.__path__ = [str(Path(spec.origin).parent)]
        utils = ModuleType(f"{OPEN_CLIP_ALIAS}.utils")
        for helper in ("to_2tuple", "feature_take_indices", "freeze_batch_norm_2d"):
            setattr(utils, helper, _image_tower_helper(helper))
        sys.modules[OPEN_CLIP_ALIAS] = package
        sys.modules[utils.__name__] = utils
    return importlib.import_module(f"{OPEN_CLIP_ALIAS}.{name}")


def _image_tower_helper(name: str):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"open_clip.utils.{name} is stubbed in this test (it needs torchvision)")

    return unavailable


def _open_clip_json(name: str) -> dict:
    folder = Path(importlib.util.find_spec("open_clip").origin).parent / "model_configs"
    return json.loads((folder / f"{name}.json").read_text())


def _open_clip_text_tower(text_cfg: dict, embed_dim: int, quick_gelu: bool) -> torch.nn.Module:
    """open_clip's own builder (``model._build_text_tower``), returning the per-token states too."""
    model = _open_clip_module("model")
    return model._build_text_tower(embed_dim, {**text_cfg, "output_tokens": True}, quick_gelu=quick_gelu)


def _open_clip_to_ours(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Rename open_clip's text tower state to our layout; q, k, v come out of the fused ``in_proj``.

    Every open_clip tensor is used except ``text_projection`` (the pooled-feature projection, which SD never uses).
    """
    prefix = "transformer.text_model."
    ours = {
        prefix + "embeddings.token_embedding.weight": state["token_embedding.weight"],
        prefix + "embeddings.position_embedding.weight": state["positional_embedding"],
        prefix + "final_layer_norm.weight": state["ln_final.weight"],
        prefix + "final_layer_norm.bias": state["ln_final.bias"],
    }
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    used = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    for i in range(layers):
        source, target = f"transformer.resblocks.{i}.", f"{prefix}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            fused = state[f"{source}attn.in_proj_{kind}"]  # (3D, D) / (3D,): q, k, v stacked in that order
            for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
                ours[f"{target}self_attn.{name}.{kind}"] = part
            used.add(f"{source}attn.in_proj_{kind}")
            for old, new in renames.items():
                ours[f"{target}{new}.{kind}"] = state[f"{source}{old}.{kind}"]
                used.add(f"{source}{old}.{kind}")
    assert set(state) - used == {"text_projection"}, sorted(set(state) - used)
    return ours


def _randomize_seeded(module: torch.nn.Module, seed: int) -> None:
    """Seeded non-trivial weights everywhere, layer norms included, so that a misplaced tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def open_clip_pair(clip_tokenizer: CLIPTokenizer) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny open_clip text tower with random weights, and those weights in our layout."""
    torch.manual_seed(0)
    tower = _open_clip_text_tower(OPEN_CLIP_TINY, embed_dim=32, quick_gelu=True).eval()
    _randomize_seeded(tower, seed=1)
    return tower, _open_clip_to_ours(tower.state_dict(), OPEN_CLIP_TINY["layers"])


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_parity_with_open_clip_text_tower(clip_tokenizer: CLIPTokenizer, open_clip_pair, layer: str) -> None:
    tower, state = open_clip_pair
    model = FrozenCLIPEmbedder(tokenizer=clip_tokenizer, text_config=OURS_TINY, layer=layer)
    model.load_state_dict(state, strict=True)  # every tensor of ours comes from open_clip
    tokens = model.tokenize(PROMPTS)  # (3, 77): the real CLIP ids, BOS ... EOS, EOS padding
    captured = []
    hook = tower.transformer.resblocks[-2].register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        ours = model(PROMPTS)
        _, last = tower(tokens)  # open_clip: final LayerNorm over every token (output_tokens=True)
    hook.remove()
    reference = last if layer == "last" else captured[0]  # penultimate: the last-but-one block, no final norm
    assert ours.shape == reference.shape == (3, 77, 32)
    assert reference.abs().max() > 0.5
    assert (ours - reference).abs().max() <= 1e-5
    assert not torch.allclose(ours[0], ours[1])


def test_open_clip_parity_tells_the_activation_apart(clip_tokenizer: CLIPTokenizer, open_clip_pair) -> None:
    """The comparison above can fail: open_clip with plain GELU (same weights) differs from our QuickGELU model."""
    tower, state = open_clip_pair
    gelu_tower = _open_clip_text_tower(OPEN_CLIP_TINY, embed_dim=32, quick_gelu=False).eval()
    gelu_tower.load_state_dict(tower.state_dict())
    model = FrozenCLIPEmbedder(tokenizer=clip_tokenizer, text_config=OURS_TINY)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        difference = (model(PROMPTS) - gelu_tower(model.tokenize(PROMPTS))[1]).abs().max()
    assert difference > 1e-3


def test_vit_l14_text_config_matches_open_clip() -> None:
    """Our ViT-L/14 constants against open_clip's shipped ViT-L-14 config, its defaults and its OpenAI weights tag."""
    assert _open_clip_module("version").__version__ == "3.3.0"
    shipped = _open_clip_json("ViT-L-14")
    text = shipped["text_cfg"]
    defaults = _open_clip_module("model").CLIPTextCfg(**text)
    openai_tag = _open_clip_module("pretrained").get_pretrained_cfg("ViT-L-14", "openai")
    ours = CLIP_VIT_L14_TEXT_CONFIG
    assert ours["hidden_size"] == text["width"] == 768
    assert ours["num_attention_heads"] == text["heads"] == 12
    assert ours["num_hidden_layers"] == text["layers"] == 12
    assert ours["max_position_embeddings"] == text["context_length"] == 77
    assert ours["vocab_size"] == text["vocab_size"] == 49408
    assert ours["intermediate_size"] == int(text["width"] * defaults.mlp_ratio) == 3072
    assert ours["projection_dim"] == shipped["embed_dim"] == 768
    # The OpenAI weights (SD v1's text encoder) use QuickGELU: open_clip's weights tag and its -quickgelu config.
    assert openai_tag["quick_gelu"] is True and ours["hidden_act"] == "quick_gelu"
    assert _open_clip_json("ViT-L-14-quickgelu") == {**shipped, "quick_gelu": True}
    # Defaults that would change the architecture: causal mask, no class token, no layer scale, standard blocks.
    assert not defaults.no_causal_mask and not defaults.embed_cls and defaults.ls_init_value is None
    assert defaults.block_type is None and not defaults.qk_norm and defaults.norm_kwargs is None
    with torch.device("meta"):
        tower = _open_clip_text_tower(text, shipped["embed_dim"], quick_gelu=openai_tag["quick_gelu"])
    assert tower.ln_final.eps == ours["layer_norm_eps"] == 1e-5
    built = clip_text_config()
    assert all(getattr(built, key) == value for key, value in ours.items())


def test_full_size_shapes_match_open_clip_vit_l14(clip_tokenizer: CLIPTokenizer) -> None:
    """open_clip's ViT-L-14 text tower, renamed, has exactly our full-size encoder's tensors and shapes."""
    shipped = _open_clip_json("ViT-L-14")
    with torch.device("meta"):
        tower = _open_clip_text_tower(shipped["text_cfg"], shipped["embed_dim"], quick_gelu=True)
        ours = FrozenCLIPEmbedder(tokenizer=clip_tokenizer)
    renamed = _open_clip_to_ours(tower.state_dict(), shipped["text_cfg"]["layers"])
    assert {key: list(value.shape) for key, value in renamed.items()} == {
        key: list(value.shape) for key, value in ours.state_dict().items()
    }
    assert len(renamed) == 196


# (d) frozen / trainable ------------------------------------------------------------------------------------------


def test_frozen_by_default(clip_tokenizer: CLIPTokenizer) -> None:
    embedder = tiny_embedder(clip_tokenizer)
    assert not any(param.requires_grad for param in embedder.parameters())
    embedder.train()
    assert not any(module.training for module in embedder.modules())
    assert not embedder(["a photo of a sks dog"]).requires_grad


def test_trainable_on_request(clip_tokenizer: CLIPTokenizer) -> None:
    embedder = tiny_embedder(clip_tokenizer, freeze=False)
    embedder.train()
    assert all(module.training for module in embedder.modules())
    embedder(["a photo of a sks dog", "a dog"]).square().mean().backward()
    grads = {name: param.grad for name, param in embedder.named_parameters()}
    assert all(grad is not None for grad in grads.values()), [name for name, grad in grads.items() if grad is None]
    assert grads["transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
