"""The CLIP BPE tokenizer, built offline from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.

transformers 5 gives no error when a tokenizer cannot be fetched: ``CLIPTokenizer.from_pretrained(hub_id)`` without
network access returns a placeholder with 2 tokens that maps every text to ``[0, 2, 2, ...]``. This module builds
the real tokenizer (49,408 tokens, the vocabulary of every OpenAI CLIP model, SD v1 included) from the BPE file that
the ``open_clip`` package ships, and refuses placeholders with an error that says how to fix the setup.

Create a tokenizer folder once, for a machine without network access::

    python -m ldm.modules.encoders.tokenizer --out DIR [--bpe FILE]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import logging
import os
from pathlib import Path

from transformers import CLIPTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
# OpenAI CLIP keeps the first 49152 - 256 - 2 merges of the file (its first line is a version header).
NUM_MERGES = 49152 - 256 - 2
INSTALL_HINT = "pip install --no-deps open-clip-torch==3.3.0"
MAKE_FOLDER_HINT = "python -m ldm.modules.encoders.tokenizer --out DIR [--bpe FILE]"


def find_clip_bpe_file() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip`` package, without importing it."""
    # `import open_clip` needs torchvision; the spec gives the package folder without running its __init__.
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / BPE_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"CLIP BPE file {BPE_FILENAME!r} not found: the `open_clip` package is not installed "
        f"(searched {locations or 'no package folder'}). Install it without its dependencies with "
        f"`{INSTALL_HINT}`, or pass the path of the file explicitly (bpe_path= / --bpe FILE)."
    )


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as OpenAI CLIP's byte-level BPE does (GPT-2 scheme)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    byte_values = list(printable)
    code_points = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return {byte: chr(code) for byte, code in zip(byte_values, code_points)}


def read_clip_bpe(bpe_path: str | os.PathLike[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Derive CLIP's vocabulary (49,408 ids) and merge list (48,894 pairs) from the BPE file, as OpenAI CLIP does."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    malformed = [merge for merge in merges if len(merge) != 2]
    if len(merges) != NUM_MERGES or malformed:
        raise ValueError(
            f"{bpe_path} is not CLIP's BPE file: expected {NUM_MERGES} merge pairs after the header, got "
            f"{len(merges)} ({len(malformed)} malformed, e.g. {malformed[:1]})"
        )
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars] + ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(bpe_path: str | os.PathLike[str] | None = None, max_length: int = 77) -> CLIPTokenizer:
    """Build OpenAI CLIP's tokenizer from the BPE file (default: the copy shipped by ``open_clip``)."""
    path = Path(bpe_path) if bpe_path is not None else find_clip_bpe_file()
    vocab, merges = read_clip_bpe(path)
    # transformers 5 keywords: `vocab_file=`/`merges_file=` would be ignored silently (a 3-token placeholder).
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_length,
    )
    check_tokenizer(tokenizer, str(path))
    return tokenizer


def save_clip_tokenizer(
    out_dir: str | os.PathLike[str], bpe_path: str | os.PathLike[str] | None = None, max_length: int = 77
) -> Path:
    """Write the CLIP tokenizer to a folder that ``CLIPTokenizer.from_pretrained(out_dir)`` loads offline."""
    out = Path(out_dir)
    build_clip_tokenizer(bpe_path, max_length=max_length).save_pretrained(str(out))
    return out


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Refuse anything but the 49,408-token CLIP tokenizer (e.g. the placeholder transformers 5 returns offline)."""
    ids = (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if ids == (CLIP_VOCAB_SIZE, BOS_TOKEN_ID, EOS_TOKEN_ID):
        return
    raise ValueError(
        f"Tokenizer loaded from {source!r} is not the CLIP tokenizer: vocab_size={ids[0]}, bos_token_id={ids[1]}, "
        f"eos_token_id={ids[2]} (expected {CLIP_VOCAB_SIZE}, {BOS_TOKEN_ID}, {EOS_TOKEN_ID}). transformers 5 returns "
        "such a placeholder without an error when the model hub cannot be reached. Point the text encoder at a "
        "local tokenizer folder instead (`cond_stage_config.params.tokenizer: /path/to/folder`, or "
        f"FrozenCLIPEmbedder(tokenizer=...)); create one once with `{MAKE_FOLDER_HINT}` (needs the BPE file: "
        f"`{INSTALL_HINT}`), or install `open_clip` that way and the tokenizer is built from its BPE file."
    )


def _looks_like_path(source: str) -> bool:
    """A hub id is `name` or `owner/name`; anything absolute, relative-dotted or home-based is a folder path."""
    return os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1


def _cached_tokenizer(hub_id: str) -> CLIPTokenizer | None:
    """The tokenizer of `hub_id` from the local hub cache, or None when it is not cached (no network access)."""
    try:
        tokenizer = CLIPTokenizer.from_pretrained(hub_id, local_files_only=True)
    except OSError:
        return None
    return tokenizer if tokenizer.vocab_size == CLIP_VOCAB_SIZE else None


def load_clip_tokenizer(source: str, max_length: int = 77) -> CLIPTokenizer:
    """Load the CLIP tokenizer from a local folder or a hub id, falling back to the BPE file for a hub id.

    A folder is loaded as is (an error if it is missing or not CLIP's). A hub id is tried in this order, so that
    nothing waits on an unreachable hub when a local source exists: the local hub cache, the BPE file shipped by
    ``open_clip`` (every OpenAI CLIP model shares this vocabulary), then a download.
    """
    folder = Path(source).expanduser()
    if folder.is_dir() or _looks_like_path(source):
        if not folder.is_dir():
            raise FileNotFoundError(f"Tokenizer folder {str(folder)!r} does not exist; make one: `{MAKE_FOLDER_HINT}`")
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        check_tokenizer(tokenizer, str(folder))
        return tokenizer
    tokenizer = _cached_tokenizer(source)
    if tokenizer is not None:
        return tokenizer
    try:
        bpe_path = find_clip_bpe_file()
    except FileNotFoundError:
        logger.info("Tokenizer %r is not cached and open_clip is not installed: downloading it", source)
    else:
        logger.info("Tokenizer %r is not in the local hub cache: building the CLIP tokenizer from %s", source, bpe_path)
        return build_clip_tokenizer(bpe_path, max_length=max_length)
    tokenizer = CLIPTokenizer.from_pretrained(source)
    check_tokenizer(tokenizer, source)
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    """Command line: write the CLIP tokenizer to a folder for use without network access."""
    parser = argparse.ArgumentParser(description="Write the CLIP tokenizer (from its BPE file) to a folder.")
    parser.add_argument("--out", required=True, help="folder to write tokenizer.json / tokenizer_config.json to")
    parser.add_argument("--bpe", default=None, help=f"path of {BPE_FILENAME} (default: the copy in open_clip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = save_clip_tokenizer(args.out, args.bpe)
    logger.info("CLIP tokenizer written to %s; use it with FrozenCLIPEmbedder(tokenizer=%r)", out, str(out))


if __name__ == "__main__":
    main()
