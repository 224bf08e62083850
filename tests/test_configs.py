"""Every original config instantiates unmodified (meta device); our configs too; config errors name the culprit."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config
from tests.reference import ORIGINAL_CONFIGS, REFERENCE_CONFIGS, SHA256, reference_config, sha256
from tests.tiny import REPO

# Listed, not globbed: a missing original config fails its tests (an empty parametrization would skip them).
ORIGINAL = list(ORIGINAL_CONFIGS)
OURS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))
# The configs this repository ships; a lost one fails here rather than dropping out of the parametrization.
EXPECTED_OURS = ["configs/dreambooth/train.yaml", "configs/instruct-pix2pix/generate.yaml",
                 "configs/shapesworld/base.yaml", "configs/shapesworld/personalize.yaml",
                 "configs/tiny/dreambooth-tiny.yaml", "configs/tiny/ip2p-tiny.yaml"]
# InstructPix2Pix's own training dataset class (its generated corpus); not part of this project.
FOREIGN_TARGETS = {"edit_dataset.EditDataset"}


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["target"]] if isinstance(node.get("target"), str) else []
        return found + [t for value in node.values() for t in _targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in _targets(value)]
    return []


def test_all_six_original_configs_are_present_and_unmodified():
    assert len(ORIGINAL) == 6
    assert sorted(p.name for p in REFERENCE_CONFIGS.glob("*.yaml")) == ORIGINAL
    for name in ORIGINAL:
        assert sha256(f"configs/{name}") == SHA256[f"configs/{name}"], name


def test_our_config_list_is_complete():
    assert len(OURS) >= len(EXPECTED_OURS)
    assert set(EXPECTED_OURS) <= set(OURS)


@pytest.mark.parametrize("name", ORIGINAL)
def test_original_config_targets_resolve(name):
    config = OmegaConf.to_container(OmegaConf.load(REFERENCE_CONFIGS / name))
    for target in _targets(config):
        if target in FOREIGN_TARGETS or target == "ldm.modules.embedding_manager.EmbeddingManager":
            continue  # the textual-inversion manager is a dead legacy param, never built (next test)
        assert get_obj_from_str(target) is not None


@pytest.mark.parametrize("name", ORIGINAL)
def test_original_model_instantiates_unmodified(name, caplog):
    config = reference_config(name)  # only ckpt_path (a file we do not have) is dropped
    with caplog.at_level(logging.WARNING), torch.device("meta"):
        model = instantiate_from_config(config.model)
    in_channels = config.model.params.unet_config.params.in_channels
    assert model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == in_channels
    assert model.scale_factor == pytest.approx(0.18215)
    if "personalization_config" in config.model.params:
        # dead legacy params are reported (once per process), not silently swallowed
        from ldm import util

        assert ("LatentDiffusion", "personalization_config") in util._reported_legacy


@pytest.mark.parametrize("name", OURS)
def test_our_configs_instantiate(name):
    config = OmegaConf.load(REPO / name)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    assert model.model.conditioning_key == "hybrid"
    for target in _targets(OmegaConf.to_container(config)):
        assert get_obj_from_str(target) is not None


def test_misspelled_model_param_is_named():
    config = reference_config("ip2p-generate.yaml")
    config.model.params["scale_factr"] = 0.2
    with pytest.raises(ConfigError, match="scale_factr"), torch.device("meta"):
        instantiate_from_config(config.model)
    config = reference_config("ip2p-generate.yaml")
    config.model.params.unet_config.params["num_headz"] = 8
    with pytest.raises(ConfigError, match="num_headz"), torch.device("meta"):
        instantiate_from_config(config.model)


def test_missing_ckpt_path_file_is_a_clear_error():
    config = reference_config("ip2p-train.yaml", drop_ckpt_path=False)
    with pytest.raises(FileNotFoundError, match="v1-5-pruned-emaonly.ckpt"), torch.device("meta"):
        instantiate_from_config(config.model)


def test_seed_finetune_data_section_instantiates(tmp_path):
    """The seed's data section, with main.py's flags applied, builds DataModuleFromConfig with train/reg/val."""
    import main
    from tests.test_train import make_pairs

    config = OmegaConf.load(REFERENCE_CONFIGS / "seed-v1-finetune_unfrozen.yaml")
    opt = main.get_parser().parse_args(["--data_root", str(make_pairs(tmp_path / "t", 2, 0, (300, 300))),
                                        "--reg_data_root", str(make_pairs(tmp_path / "r", 2, 1, (300, 300))),
                                        "--class_word", "cat"])
    main.apply_data_flags(config, opt)
    data = instantiate_from_config(config.data)
    assert isinstance(data, main.DataModuleFromConfig)
    data.setup("fit")
    train, reg = next(iter(data.train_dataloader()))
    assert train["image"].shape == (1, 3, 256, 256)
    assert train["caption"] == ["replace the wolf with a sks cat"] and reg["caption"] == ["replace the wolf with a cat"]


def test_data_root_given_twice_trains_and_validates_on_both_folders(tmp_path):
    """main.py --data_root A --data_root B: the training (and validation) set reads A's pairs, then B's; one
    --data_root stays a plain string in the saved config, as in the seed's."""
    import main
    from tests.test_train import make_pairs

    roots = [make_pairs(tmp_path / "t", 2, 0, (300, 300)), make_pairs(tmp_path / "l", 3, 1, (300, 300))]
    config = OmegaConf.load(REFERENCE_CONFIGS / "seed-v1-finetune_unfrozen.yaml")
    opt = main.get_parser().parse_args(["--data_root", str(roots[0]), "--data_root", str(roots[1]),
                                        "--reg_data_root", str(roots[0]), "--class_word", "cat"])
    main.apply_data_flags(config, opt)
    assert config.data.params.train.params.data_root == config.data.params.validation.params.data_root == [
        str(root) for root in roots]
    data = instantiate_from_config(config.data)
    data.setup("fit")
    for dataset in (data.datasets["train"], data.datasets["validation"]):
        assert [p.input.parent for p in dataset.pairs] == [roots[0]] * 2 + [roots[1]] * 3
    single = OmegaConf.load(REFERENCE_CONFIGS / "seed-v1-finetune_unfrozen.yaml")
    main.apply_data_flags(single, main.get_parser().parse_args(["--data_root", str(roots[1]),
                                                               "--reg_data_root", str(roots[0])]))
    assert single.data.params.train.params.data_root == str(roots[1])
