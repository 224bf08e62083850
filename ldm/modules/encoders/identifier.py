"""Check a subject identifier against CLIP's vocabulary: one rare token, as DreamBooth's ``sks``.

DreamBooth names the subject with a rare token so that fine-tuning binds it to the subject without overwriting a
word the model already knows: a word that splits into several tokens spreads the subject over pieces that each
keep their meaning, and a frequent word (``dog``, ``red``) carries a strong prior that must be unlearned (and is
forgotten elsewhere). CLIP's byte-pair vocabulary is built in order of frequency — ids 0-511 are characters, every
later id is a merge learned after all more frequent ones — so a token's id ranks how common it is.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

FREQUENT_TOKEN_LIMIT = 20000  # ids below this are the ~19,500 most frequent merges: common words
SUGGESTED_IDENTIFIERS = ("sks", "ohwx", "phol", "bnha")  # single tokens with ids above 47,000


def identifier_problems(identifier: str, tokenizer: Any) -> list[str]:
    """Why ``identifier`` is a poor subject token for ``tokenizer`` (a CLIP tokenizer); empty when it is fine."""
    ids = tokenizer(identifier, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in ids]
        return [f"{identifier!r} is {len(ids)} CLIP tokens ({' + '.join(pieces)}), not one"]
    if ids[0] < FREQUENT_TOKEN_LIMIT:
        return [f"{identifier!r} is a common word for CLIP (token {ids[0]} of {tokenizer.vocab_size}; its vocabulary "
                f"is ordered by frequency), whose meaning the subject would have to overwrite"]
    return []


def warn_about_identifier(identifier: str, tokenizer: Any = None, option: str = "--identifier") -> list[str]:
    """Log a warning naming better identifiers when ``identifier`` is not one rare CLIP token; returns the problems.

    Without ``tokenizer`` the CLIP tokenizer is built from its BPE file (`ldm.modules.encoders.tokenizer`); when
    that file is not installed the check is skipped with an info message.
    """
    if tokenizer is None:
        from ldm.modules.encoders.tokenizer import build_clip_tokenizer

        try:
            tokenizer = build_clip_tokenizer()
        except FileNotFoundError as err:
            logger.info("identifier %r not checked: %s", identifier, err)
            return []
    problems = identifier_problems(identifier, tokenizer)
    if problems:
        logger.warning("%s %s: %s. DreamBooth uses a rare single token; good choices: %s", option, identifier,
                       "; ".join(problems), ", ".join(SUGGESTED_IDENTIFIERS))
    return problems
