#!/usr/bin/env python
"""Download the released InstructPix2Pix checkpoint, resumably, and verify it.

    python scripts/download_checkpoint.py                        # the .ckpt at the URL of the original README
    python scripts/download_checkpoint.py --source huggingface   # the single-file .safetensors release
    python scripts/download_checkpoint.py --url URL --output PATH --sha256 HEX

Bytes go to ``<output>.part``. An interrupted transfer (cut connection, timeout, HTTP 5xx) is resumed with an
HTTP Range request, also on the next run. Only a complete, verified file is renamed (``os.replace``) to the output.
A file that fails verification is deleted, ``.part`` included: resuming a complete but wrong file cannot repair it.

Other scripts reuse the logic: ``from download_checkpoint import download`` (when run from ``scripts/``).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[1] / "models" / "instruct-pix2pix"
CHUNK_SIZE = 1 << 20
MAX_BACKOFF_S = 60.0
USER_AGENT = "instruct2dream-download/1.0"
# Statuses worth another try after a pause; every other HTTP error is final.
RETRYABLE_HTTP = frozenset({408, 429, 500, 502, 503, 504})

EXIT_FAILED = 1
EXIT_EXISTS = 3
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Source:
    """A known release; ``size`` and ``sha256`` stay None unless the publisher states them."""

    url: str
    size: int | None = None
    sha256: str | None = None


# No sha256 or byte size is pinned: the original README and model card state none, and none could be checked
# when this was written (a guessed value would only make correct downloads fail). The Hugging Face file page
# shows the LFS sha256 of the .safetensors; pass it with --sha256.
SOURCES: dict[str, Source] = {
    "berkeley": Source("http://instruct-pix2pix.eecs.berkeley.edu/instruct-pix2pix-00-22000.ckpt"),
    "huggingface": Source(
        "https://huggingface.co/timbrooks/instruct-pix2pix/resolve/main/instruct-pix2pix-00-22000.safetensors"
    ),
}


class DownloadError(RuntimeError):
    """A download that failed for good: HTTP error, retries exhausted, or a bad file; the message names the URL."""


class VerificationError(DownloadError):
    """The downloaded bytes do not have the expected size or sha256."""


class _Interrupted(Exception):
    """A transfer that can be resumed after a pause: connection refused, cut or timed out, or a transient status."""


def parse_sha256(value: str | None) -> str | None:
    """Return ``value`` as a lower-case 64-digit hex sha256, or None for None."""
    if value is None:
        return None
    digest = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"not a sha256 hex digest (64 hex digits): {value!r}")
    return digest


def sha256_file(path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE) -> str:
    """Return the hex sha256 of the file at ``path``."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            hasher.update(chunk)
    return hasher.hexdigest()


def part_path(dest: str | os.PathLike[str]) -> Path:
    """Return the ``<dest>.part`` path that holds an unfinished download."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def default_output(url: str) -> Path:
    """Return ``models/instruct-pix2pix/<last path segment of url>`` under the repository root."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot take a file name from URL {url!r}; give an output path")
    return MODELS_DIR / name


class _PartFile:
    """The ``.part`` file plus a running sha256 of the bytes it holds, so the file is hashed once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self.size = 0

    def sync(self) -> int:
        """Make the running hash cover the bytes on disk (a ``.part`` left by an earlier run); return their count."""
        on_disk = self.path.stat().st_size if self.path.exists() else 0
        if on_disk != self.size:
            self.hasher = hashlib.sha256()
            with self.path.open("rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    self.hasher.update(chunk)
            self.size = on_disk
        return self.size

    def restart(self) -> None:
        """Empty the file and the hash."""
        self.path.write_bytes(b"")
        self.hasher = hashlib.sha256()
        self.size = 0

    def append_from(self, response: http.client.HTTPResponse, chunk_size: int, bar: tqdm) -> None:
        """Append the response body until it ends; a failed read becomes ``_Interrupted`` with the bytes kept."""
        with self.path.open("ab") as f:
            while True:
                try:
                    chunk = response.read(chunk_size)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Interrupted(f"connection lost at byte {self.size}: {exc!r}") from exc
                if not chunk:
                    return
                f.write(chunk)
                self.hasher.update(chunk)
                self.size += len(chunk)
                bar.update(len(chunk))


def _content_range(value: str | None, url: str) -> tuple[int, int | None]:
    """Parse a 206 ``Content-Range: bytes START-END/TOTAL`` into (START, TOTAL or None for ``*``)."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
    if match is None:
        raise DownloadError(f"HTTP 206 with an unreadable Content-Range {value!r} for {url}")
    total = None if match[3] == "*" else int(match[3])
    return int(match[1]), total


def _range_not_satisfiable(exc: urllib.error.HTTPError, part: _PartFile, url: str) -> None:
    """Handle HTTP 416 to a resume request: done if the ``.part`` is the whole file, else start over."""
    match = re.fullmatch(r"bytes \*/(\d+)", (exc.headers.get("Content-Range") or "").strip())
    if match is None:
        logger.warning("HTTP 416 without a total size from %s; taking the %d bytes of %s as complete",
                       url, part.size, part.path)
        return
    total = int(match[1])
    if total == part.size:
        logger.info("%s already holds all %d bytes", part.path, total)
        return
    part.restart()
    raise _Interrupted(f"{part.path} did not match the {total}-byte file on the server; starting over")


def _fetch_once(url: str, part: _PartFile, timeout: float, chunk_size: int, bar: tqdm) -> None:
    """One HTTP request that resumes ``part`` where it stops and appends to it until the body ends."""
    offset = part.sync()
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            _range_not_satisfiable(exc, part, url)
            return
        if exc.code in RETRYABLE_HTTP:
            raise _Interrupted(f"HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise _Interrupted(f"cannot reach {url}: {exc}") from exc
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"), url)
            if start != offset:
                part.restart()
                raise _Interrupted(f"server resumed at byte {start} instead of {offset}; starting over")
        elif response.status == 200:
            if offset:
                logger.warning("%s ignored the Range request; downloading again from byte 0", url)
                part.restart()
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        else:
            raise DownloadError(f"unexpected HTTP {response.status} {response.reason} for {url}")
        bar.reset(total=total)
        bar.update(part.size)
        part.append_from(response, chunk_size, bar)
    if total is not None and part.size != total:
        raise _Interrupted(f"connection closed after {part.size} of {total} bytes")


def download(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None = None,
    *,
    expected_size: int | None = None,
    force: bool = False,
    timeout: float = 60.0,
    retries: int = 5,
    backoff: float = 2.0,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` through ``<dest>.part`` with resume, retries and verification; return ``dest``.

    An existing ``dest`` is returned untouched when its sha256 equals ``sha256``; otherwise it raises
    ``FileExistsError`` unless ``force``. Interruptions are retried ``retries`` times, sleeping ``backoff * 2**k``
    seconds (at most 60); then ``DownloadError`` is raised and the ``.part`` kept for the next call to resume.
    A size or sha256 mismatch raises ``VerificationError`` and deletes the ``.part``; ``dest`` is never touched.
    """
    dest = Path(dest)
    sha256 = parse_sha256(sha256)
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if dest.exists() and not force:
        if sha256 is None:
            raise FileExistsError(f"{dest} already exists; use --force (force=True) to replace it")
        found = sha256_file(dest)
        if found != sha256:
            raise FileExistsError(f"{dest} already exists with sha256 {found}, not {sha256}; "
                                  "use --force (force=True) to replace it")
        logger.info("%s is already there (sha256 matches)", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _PartFile(part_path(dest))
    logger.info("downloading %s -> %s", url, part.path)
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress) as bar:
        for attempt in range(retries + 1):
            try:
                _fetch_once(url, part, timeout, chunk_size, bar)
                break
            except _Interrupted as exc:
                if attempt == retries:
                    raise DownloadError(f"giving up on {url} after {retries + 1} attempts ({exc}); "
                                        f"{part.path} is kept and the next run resumes it") from exc
                delay = min(backoff * 2**attempt, MAX_BACKOFF_S)
                logger.warning("%s; retry %d/%d in %.1f s", exc, attempt + 1, retries, delay)
                time.sleep(delay)
    _verify(url, part, sha256, expected_size)
    with part.path.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(part.path, dest)
    return dest


def _verify(url: str, part: _PartFile, sha256: str | None, expected_size: int | None) -> None:
    """Check the finished ``.part`` against the expected size and sha256; delete it and raise if it fails."""
    digest = part.hasher.hexdigest()
    problems = []
    if expected_size is not None and part.size != expected_size:
        problems.append(f"{part.size} bytes instead of {expected_size}")
    if sha256 is not None and digest != sha256:
        problems.append(f"sha256 {digest} instead of {sha256}")
    if problems:
        part.path.unlink()
        raise VerificationError(f"download of {url} is wrong ({'; '.join(problems)}); deleted {part.path}")
    if sha256 is None:
        logger.info("sha256 %s (no expected value; pass it as --sha256 to check later copies)", digest)
    else:
        logger.info("sha256 verified: %s", digest)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    sources = "\n".join(f"  {name:<12} {source.url}" for name, source in SOURCES.items())
    parser = argparse.ArgumentParser(
        description="Download the released InstructPix2Pix checkpoint (resumable, verified).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"known sources:\n{sources}\n\n"
            "No sha256 or size is built in for either source: neither README nor model card states one, so none\n"
            "could be checked. The Hugging Face file page shows the .safetensors' LFS sha256: pass it with --sha256.\n"
            "The script prints the sha256 of what it downloaded; pass that to --sha256 to check another copy.\n"
            "An interrupted download stays in OUTPUT.part and the same command resumes it; a file that fails\n"
            "verification is deleted.\n\n"
            f"exit status: 0 done or already there, {EXIT_FAILED} download or verification failed, 2 bad arguments,\n"
            f"{EXIT_EXISTS} output exists (use --force), {EXIT_INTERRUPTED} interrupted."
        ),
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--source", choices=sorted(SOURCES), default="berkeley",
                       help="known release to fetch (default: berkeley)")
    where.add_argument("--url", help="fetch this URL instead of a known source")
    parser.add_argument("--output", type=Path,
                        help="destination file (default: models/instruct-pix2pix/<file name of the URL> "
                             "in the repository)")
    parser.add_argument("--sha256", help="expected sha256 (hex); also accepts an existing output that matches")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry (60)")
    parser.add_argument("--retries", type=int, default=5, help="retries after an interruption (5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    source = None if args.url else SOURCES[args.source]
    url = args.url or source.url
    try:
        sha256 = parse_sha256(args.sha256) or (source.sha256 if source else None)
        output = args.output or default_output(url)
    except ValueError as exc:
        parser.error(str(exc))
    if args.retries < 0:
        parser.error(f"--retries must be >= 0, got {args.retries}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    already_there = output.exists() and not args.force
    try:
        download(url, output, sha256, expected_size=source.size if source else None, force=args.force,
                 timeout=args.timeout, retries=args.retries)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_EXISTS
    except (DownloadError, OSError) as exc:  # OSError: the output folder cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to resume {part_path(output)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if already_there:
        print(f"{output} is already there and its sha256 matches; nothing to do")
    else:
        print(f"saved {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
