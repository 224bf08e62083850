"""Identifier check (main.py --identifier, generate_dataset.py --identifier) with the real CLIP tokenizer, built offline."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from ldm.modules.encoders.identifier import (FREQUENT_TOKEN_LIMIT, SUGGESTED_IDENTIFIERS, identifier_problems,
                                             warn_about_identifier)


@pytest.fixture(scope="module")
def tokenizer():
    from ldm.modules.encoders.tokenizer import build_clip_tokenizer

    built = build_clip_tokenizer()  # from open_clip's BPE file: a missing file fails the test, as it should
    assert built.vocab_size == 49408
    return built


def test_rare_single_tokens_pass(tokenizer):
    for word in ("sks", *SUGGESTED_IDENTIFIERS):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] >= FREQUENT_TOKEN_LIMIT, (word, ids)
        assert identifier_problems(word, tokenizer) == []
    assert tokenizer("sks", add_special_tokens=False)["input_ids"] == [48136]


@pytest.mark.parametrize("word, problem", [
    ("dog", "common word for CLIP (token 1929 "),
    ("red", "common word"),
    ("photo", "common word"),
    ("xjy", "3 CLIP tokens (x + j + y)"),
    ("sks dog", "2 CLIP tokens (sks + dog)"),
    ("mysubject", "CLIP tokens"),
])
def test_poor_identifiers_are_named(tokenizer, word, problem):
    (found,) = identifier_problems(word, tokenizer)
    assert problem in found


def test_warning_names_alternatives(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        assert warn_about_identifier("dog", tokenizer) != []
    (record,) = caplog.records
    assert "--identifier dog" in record.message and "sks, ohwx" in record.message
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert warn_about_identifier("sks", tokenizer) == []
    assert caplog.records == []


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "identifier" in r.getMessage()]


def test_main_warns_when_the_identifier_is_applied(caplog, tmp_path):
    import main

    config = OmegaConf.create({"data": {"params": {"train": {"params": {"data_root": str(tmp_path)}}}}})
    opt, _ = main.parse_args(["-b", "x.yaml", "-t", "--identifier", "dog"])
    with caplog.at_level(logging.WARNING):
        main.apply_data_flags(config, opt)
    assert config.data.params.train.params.identifier == "dog"
    (message,) = _warnings(caplog)
    assert "common word" in message and "sks" in message
    caplog.clear()
    opt, _ = main.parse_args(["-b", "x.yaml", "-t", "--identifier", "ohwx"])
    with caplog.at_level(logging.WARNING):
        main.apply_data_flags(config, opt)
    assert _warnings(caplog) == []


def test_generate_dataset_warns_for_training_pairs_only(caplog):
    from scripts.generate_dataset import check_words, parse_args

    common = ["--class_word", "dog", "--source_word", "wolf", "--identifier", "xjy", "--output", "unused"]
    with caplog.at_level(logging.WARNING):
        check_words(parse_args(["--mode", "train", "--subject_dir", "unused", *common]))
    (message,) = _warnings(caplog)
    assert "3 CLIP tokens" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # regularization captions carry no identifier
        check_words(parse_args(["--mode", "reg", "--reg_source_dir", "unused", *common]))
    assert _warnings(caplog) == []
