"""scripts/edit_app.py in a real headless browser: Debian's Chromium, driven by playwright, on a tiny model.

The app runs as its own process (the real CLI) on 127.0.0.1; the page is used as a person would: upload a photo,
type the instruction, run, download the result. Requests to anything but the app are blocked and recorded, so the
page is shown to work offline. Without /usr/bin/chromium these tests fail (they are the app's only test).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from ldm.data.transforms import edit_size
from scripts.edit_cli import main as edit_cli_main
from tests.tiny import REPO, TINY_CONFIG, save_tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium waits on services it cannot reach on a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SETTINGS = ["--steps", "3", "--resolution", "128"]
PHOTO_SIZE = (451, 300)  # scikit-image's "chelsea" photo
START_TIMEOUT = 180  # seconds for the app to import gradio and load the model on a busy 2-core machine
EDIT_TIMEOUT = 60_000  # milliseconds for one tiny edit to show in the page


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", seed=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A real photo (JPEG, as from a camera) and files that are not acceptable photos."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    image = Image.fromarray(skimage.data.chelsea())
    assert image.size == PHOTO_SIZE
    image.save(folder / "cat.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    Image.new("1", (12000, 10000)).save(folder / "huge.png")  # 120 megapixels in 15 KB
    return folder


class App:
    """The app's process: its URL and its log."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def app(tiny_ckpt, tmp_path_factory) -> Iterator[App]:
    """``python scripts/edit_app.py`` on a free port, stopped (SIGTERM, like Ctrl-C) at the end."""
    work = tmp_path_factory.mktemp("app")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(work / "gradio"), "TMPDIR": str(work)}
    log = work / "app.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "scripts/edit_app.py", "--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt),
             *SETTINGS, "--port", str(port)],
            cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )
    app = App(f"http://127.0.0.1:{port}/", process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"edit_app.py exited with status {process.returncode}:\n{app.log_text()}")
            try:
                urllib.request.urlopen(app.url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"edit_app.py did not serve {app.url} within {START_TIMEOUT} s:\n{app.log_text()}")
                time.sleep(0.5)
        yield app
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, app.log_text()
    assert not list(work.glob("instruct2dream-app-*")), "the app left its output folder behind"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Headless Chromium from the OS packages (playwright never downloads a browser here)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is missing ({CHROMIUM}): the browser test needs Debian's chromium package. "
                    "`bash scripts/setup_env.sh --test` installs it as root or with sudo; else: sudo apt-get install "
                    "chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        pytest.fail(f"playwright is not installed ({err}): run `bash scripts/setup_env.sh --test`")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, app):
    """A fresh page on the app; every request that leaves the app is blocked and recorded in ``page.external``."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.external = []

    def only_the_app(route) -> None:
        if route.request.url.startswith(app.url):
            route.continue_()
        else:
            page.external.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_app)
    page.goto(app.url)
    page.wait_for_selector("#run")
    yield page
    context.close()


def _run_edit(page) -> tuple[str, int]:
    """Click Edit and wait for the status line of the next edit; returns it and the seed the page shows."""
    from playwright.sync_api import expect

    status = page.locator("#status")
    done = re.search(r"Edit (\d+):", status.inner_text())
    expected = rf"Edit {int(done.group(1)) + 1}:" if done else r"Edit \d+:"  # a new page: the app counts on
    page.click("#run")
    expect(status).to_contain_text(re.compile(expected), timeout=EDIT_TIMEOUT)
    text = status.inner_text()
    seed = re.search(r"seed (\d+)", text).group(1)
    expect(page.locator("#seed-used input")).to_have_value(seed)  # the seed used, and in the seed field for reuse
    expect(page.locator("#seed input")).to_have_value(seed)
    return text, int(seed)


def _download(page, index: int, folder: Path) -> Path:
    """Save the ``index``-th file of the page's download list through the browser's download."""
    with page.expect_download() as info:
        page.locator("#download a").nth(index).click()
    target = folder / info.value.suggested_filename
    info.value.save_as(target)
    return target


def _metadata(path: Path) -> dict:
    return json.loads(Image.open(path).text["instruct2dream"])


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _fill_photo_and_instruction(page, photo: Path, instruction: str) -> None:
    page.locator("#photo input[type=file]").set_input_files(str(photo))
    page.locator("#photo img").wait_for()
    page.locator("#instruction textarea").fill(instruction)


def test_edit_in_the_browser_matches_edit_cli_and_repeats_with_its_seed(app, page, photos, tiny_ckpt, tmp_path):
    _fill_photo_and_instruction(page, photos / "cat.jpg", "make it snowy")
    page.locator("#randomize input").uncheck()
    page.locator("#seed input").fill("7")
    status, seed = _run_edit(page)
    assert seed == 7 and "192×128" in status
    first = _download(page, 0, tmp_path)
    assert first.name == "cat_seed7.png"
    assert Image.open(first).size == edit_size(*PHOTO_SIZE, 128) == (192, 128)  # IP2P's size rule
    meta = _metadata(first)
    assert meta == {"edit": "make it snowy", "seed": 7, "steps": 3, "sampler": "euler_ancestral", "resolution": 128,
                    "cfg_text": 7.5, "cfg_image": 1.5, "ckpt": "tiny.ckpt", "ema": True, "input": "cat.jpg"}
    # The image shown is the file downloaded.
    src = page.locator("#result img").get_attribute("src")
    assert page.request.get(src).body() == first.read_bytes()

    # The same seed again: the same image, from the model loaded once.
    (tmp_path / "again").mkdir()
    assert _run_edit(page)[1] == 7
    again = _download(page, 0, tmp_path / "again")
    assert np.array_equal(_pixels(again), _pixels(first))
    log = app.log_text()
    assert log.count("INFO loaded ") == 1 and "INFO edit 2: cat.jpg" in log, log

    # edit_cli with the same settings writes the same pixels and the same settings.
    cli_out = tmp_path / "cli.png"
    assert edit_cli_main(["--input", str(photos / "cat.jpg"), "--output", str(cli_out), "--edit", "make it snowy",
                          "--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--seed", "7", "--quiet",
                          *SETTINGS]) == 0
    assert np.array_equal(_pixels(cli_out), _pixels(first))
    assert _metadata(cli_out) == meta

    # A randomized seed is shown, written into the seed field and recorded in the PNG.
    page.locator("#randomize input").check()
    _, seed = _run_edit(page)
    (tmp_path / "random").mkdir()
    assert _metadata(_download(page, 0, tmp_path / "random"))["seed"] == seed
    assert page.external == []


def test_cfg_sweep_shows_a_labelled_grid_equal_to_edit_cli(page, photos, tiny_ckpt, tmp_path):
    _fill_photo_and_instruction(page, photos / "cat.jpg", "make it snowy")
    page.locator("#randomize input").uncheck()
    page.locator("#seed input").fill("3")
    page.get_by_text("CFG sweep").click()
    page.locator("#sweep input").check()
    page.locator("#sweep-text textarea").fill("3, 7.5")
    page.locator("#sweep-image textarea").fill("1.5")
    assert "2 image(s)" in _run_edit(page)[0]
    names = page.locator("#download a").all_inner_texts()
    assert len(names) == 3
    grid = _download(page, 0, tmp_path)
    assert grid.name == "cat_seed3_grid.png"
    assert _metadata(grid)["cfg_text"] == [3.0, 7.5] and _metadata(grid)["cfg_image"] == [1.5]
    assert Image.open(grid).height > 2 * 128  # one column per image scale: the two tiles stacked, with labels
    cli = tmp_path / "cli"
    assert edit_cli_main(["--input", str(photos / "cat.jpg"), "--output", str(cli), "--edit", "make it snowy",
                          "--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--seed", "3", "--quiet",
                          "--cfg-text", "3", "7.5", "--cfg-image", "1.5", *SETTINGS]) == 0
    assert np.array_equal(_pixels(grid), _pixels(cli / "cat_grid.png"))
    tile = _download(page, 2, tmp_path)
    assert tile.name == "cat_seed3_txt7.5_img1.5.png"
    assert np.array_equal(_pixels(tile), _pixels(cli / "cat_txt7.5_img1.5.png"))


def test_contrast_instruction_matches_edit_cli_with_each_sampler(page, photos, tiny_ckpt, tmp_path):
    _fill_photo_and_instruction(page, photos / "cat.jpg", "replace the cat with a sks dog")
    page.locator("#randomize input").uncheck()
    page.locator("#seed input").fill("5")
    page.get_by_text("More settings").click()
    page.locator("#contrast textarea").fill("replace the cat with a dog")
    for sampler in ("euler_ancestral", "ddim"):
        if sampler != "euler_ancestral":
            page.locator("#sampler input").click()
            page.get_by_role("option", name=sampler).click()
        _run_edit(page)
        folder = tmp_path / sampler
        edited = _download(page, 0, folder)
        meta = _metadata(edited)
        assert (meta["contrast"], meta["cfg_contrast"], meta["contrast_min_sigma"], meta["sampler"]) == (
            "replace the cat with a dog", 2.0, 0.4, sampler)
        cli_out = folder / "cli.png"
        assert edit_cli_main(["--input", str(photos / "cat.jpg"), "--output", str(cli_out), "--edit",
                              "replace the cat with a sks dog", "--contrast", "replace the cat with a dog",
                              "--sampler", sampler, "--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG),
                              "--seed", "5", "--quiet", *SETTINGS]) == 0
        assert np.array_equal(_pixels(cli_out), _pixels(edited))
        assert _metadata(cli_out) == meta


@pytest.mark.parametrize(
    "upload,instruction,message",
    [
        (None, "make it snowy", "Upload a photo first."),
        ("cat.jpg", "   ", "Type an instruction first"),
        ("notes.txt", "make it snowy", "Invalid file type: notes.txt. Only image/* allowed."),
        ("broken.png", "make it snowy", "“broken.png” is not an image that can be read"),
        ("huge.png", "make it snowy", "“huge.png” is too large: 12000×10000 is 120 megapixels, the limit is 50."),
    ],
    ids=["no-photo", "empty-instruction", "text-file", "broken-image", "huge-image"],
)
def test_bad_uploads_show_a_clear_message(app, page, photos, upload, instruction, message):
    if upload is not None:
        page.locator("#photo input[type=file]").set_input_files(str(photos / upload))
        if upload != "notes.txt":  # the page refuses that one itself; the others are uploaded before the run
            page.locator("#photo img").wait_for()
    page.locator("#instruction textarea").fill(instruction)
    page.click("#run")
    toast = page.locator(".toast-body", has_text=message)
    toast.wait_for(timeout=EDIT_TIMEOUT)
    assert "Traceback" not in page.locator("body").inner_text()
    assert app.process.poll() is None


def test_parse_scales_and_cli_errors(tmp_path, capsys):
    from scripts.edit_app import main, parse_scales

    assert parse_scales(" 5, 7.5 10 ", "Text CFG values") == [5.0, 7.5, 10.0]
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_scales("5, x", "Text CFG values")
    with pytest.raises(ValueError, match="at least one value"):
        parse_scales(" , ", "Image CFG values")
    # A missing checkpoint stops before anything is served, with one line.
    assert main(["--config", str(TINY_CONFIG), "--ckpt", str(tmp_path / "nope.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
