"""The repository is self-contained: its test data is complete and unmodified, and no source reads outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.reference import DATA, MANIFESTS, ORIGINAL_CONFIGS, REPO, SHA256, manifest, sha256

# Code and configs: every place a path could be built. tests/data holds verbatim originals (facts, not code).
SCANNED_DIRS = ("ldm", "scripts", "bench", "tests", "configs")
SCANNED_SUFFIXES = {".py", ".sh", ".yaml", ".yml"}
# A path that names something beside the checkout, whatever the file's depth.
ESCAPING_PATTERNS = [
    re.compile(r"""/\s*["']shared["']"""),  # a path joined with the component shared
    re.compile(r"""["']shared["']\s*/"""),  # the component shared joined with more
    re.compile(r"""["'](?:shared|/work)/"""),  # a string starting with shared/ or /work/
    re.compile(r"""["'][^"'\n]*/[s]hared/"""),  # a string holding the folder shared ([s]: no self-match)
    re.compile(r"""["'][^"'\n]*\.\./"""),  # a string holding dot-dot-slash
    re.compile(r"""["']\.\.["']"""),  # the string dot-dot, as in os.path.join(here, dot-dot)
    re.compile(r"""\b(?:REPO|ROOT|REPO_ROOT|PROJECT_ROOT)\.parents?\b"""),  # one above the repository root
]
PARENTS_INDEX = re.compile(r"\.parents\[(\d+)\]")
PARENT_CHAIN = re.compile(r"__file__\)(?:\.resolve\(\)|\.absolute\(\))?((?:\.parent\b)+)")
DIRNAME = re.compile(r"dirname\(")


def scanned_files() -> list[Path]:
    """Sources to check: the scanned folders (minus tests/data) and the top-level scripts."""
    found = [p for p in REPO.iterdir() if p.is_file() and p.suffix in SCANNED_SUFFIXES]
    for folder in SCANNED_DIRS:
        found += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in SCANNED_SUFFIXES]
    return sorted(p for p in found if DATA not in p.parents and "__pycache__" not in p.parts)


def escapes(relative: str, text: str) -> list[str]:
    """Lines of ``text`` (the file ``relative`` to the repository root) that build a path outside the repository.

    ``Path(__file__).parents[k]`` is the repository root for k = depth - 1 (depth: the number of parts of
    ``relative``), so any k >= depth leaves it; so do ``.parent`` chains and ``os.path.dirname`` nests of more
    than depth levels, and the named patterns above.
    """
    depth = len(Path(relative).parts)
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        leaves = any(pattern.search(line) for pattern in ESCAPING_PATTERNS)
        leaves |= any(int(k) >= depth for k in PARENTS_INDEX.findall(line))
        leaves |= any(chain.count(".parent") > depth for chain in PARENT_CHAIN.findall(line))
        leaves |= "__file__" in line and len(DIRNAME.findall(line)) > depth
        if leaves:
            found.append(f"{relative}:{number}: {line.strip()}")
    return found


def test_no_source_reads_outside_the_repository():
    files = scanned_files()
    assert len(files) > 50, [str(p) for p in files]  # the scan sees the code (a wrong root would see nothing)
    names = {str(p.relative_to(REPO)) for p in files}
    assert {"main.py", "tests/reference.py", "tests/test_text_encoder.py", "configs/tiny/ip2p-tiny.yaml"} <= names
    offending = [line for p in files for line in escapes(str(p.relative_to(REPO)), p.read_text())]
    assert offending == []


# Templates (filled by FILL), so that this file holds no escaping path itself.
ESCAPING_SAMPLES = [
    ("tests/reference.py", "REFERENCE = {repo}.parent / {q}{shared}{q} / {q}reference{q}"),
    ("tests/x.py", "MANIFEST = Path(__file__).resolve().{parents}[2] / {q}{shared}{q} / {q}keys.json{q}"),
    ("tests/x.py", "MANIFEST = Path(__file__).resolve().{parents}[1] / {q}{shared}/reference/keys.json{q}"),
    ("ldm/modules/x.py", "ROOT = Path(__file__).resolve().{parents}[3]"),
    ("bench/x.py", "ROOT = Path(__file__).resolve().{parent}.{parent}.{parent}"),
    ("scripts/x.py", "ROOT = os.path.{dirname}(os.path.{dirname}(os.path.{dirname}(__file__)))"),
    ("scripts/x.sh", "python main.py --config {q}{dots}/{shared}/configs/x.yaml{q}"),
    ("tests/x.py", "CONFIGS = Path({q}/work/{shared}/reference{q})"),
    ("tests/x.py", "path = os.path.join(here, {q}{dots}{q}, {q}data{q})"),
]
INSIDE_SAMPLES = [
    ("tests/reference.py", "REPO = Path(__file__).resolve().{parents}[1]"),
    ("ldm/modules/x.py", "ROOT = Path(__file__).resolve().{parents}[2]"),
    ("bench/x.py", "sys.path.insert(0, str(Path(__file__).resolve().{parent}))"),
    ("bench/x.py", "ROOT = Path(__file__).resolve().{parent}.{parent}"),
    ("tests/x.py", "DATA = REPO / {q}tests{q} / {q}data{q}"),
    ("ldm/x.py", "{q}{q}{q}Config plumbing {shared} by the whole codebase.{q}{q}{q}"),
]
FILL = {"repo": "REPO", "shared": "shared", "parents": "parents", "parent": "parent", "dirname": "dirname",
        "dots": "." * 2, "q": '"'}


@pytest.mark.parametrize(("relative", "template"), ESCAPING_SAMPLES)
def test_the_scan_flags_escaping_paths(relative, template):
    assert len(ESCAPING_SAMPLES) == 9
    line = template.format(**FILL)
    assert escapes(relative, line) == [f"{relative}:1: {line}"]


@pytest.mark.parametrize(("relative", "template"), INSIDE_SAMPLES)
def test_the_scan_accepts_paths_inside_the_repository(relative, template):
    assert len(INSIDE_SAMPLES) == 6
    assert escapes(relative, template.format(**FILL)) == []


def test_test_data_is_complete_and_unmodified():
    present = sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file())
    assert present == sorted([*SHA256, "README.md"])
    configs = sorted(key for key in SHA256 if key.startswith("configs/"))
    assert configs == sorted(f"configs/{name}" for name in ORIGINAL_CONFIGS)
    for relative, digest in SHA256.items():
        assert sha256(relative) == digest, relative


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifests_hold_every_key(name):
    """The counts stated in tests/data/README.md: 1831 keys in five groups."""
    assert len(MANIFESTS) == 2
    data = manifest(name)
    groups = {}
    for entry in data["entries"]:
        groups[entry["group"]] = groups.get(entry["group"], 0) + 1
    assert data["num_keys"] == len(data["entries"]) == 1831
    assert groups == {"schedule": 12, "unet": 686, "ema": 688, "vae": 248, "text": 197}
