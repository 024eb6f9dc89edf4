"""The Gradio demo (guidance_engine.pipelines.demo_app): API through gradio_client, the queue under
simultaneous requests, error messages, and a headless-Chromium browser run."""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from guidance_engine.pipelines import demo_app  # noqa: E402

STEPS = 4
# gradio's queue calls pandas APIs that pandas 3 deprecates; not this project's warnings
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
PROMPT = "a red circle on a blue background"
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    demo = demo_app.build_demo()
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        yield demo, url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[1], verbose=False)


def _check_result(result, methods):
    gallery, stats, message = result
    assert len(gallery) == len(methods) and len(stats) == len(methods)
    for item, row, name in zip(gallery, stats, methods):
        assert Path(item["image"]).is_file()
        from PIL import Image

        with Image.open(item["image"]) as image:
            assert image.size == (32 * demo_app.UPSCALE, 32 * demo_app.UPSCALE)  # nearest 4x upscale
        assert row["method"] == name
        assert row["nfe"] > 0 and row["seconds"] > 0 and 0 <= row["saturation"] <= 1
        caption = item["caption"]
        assert caption.startswith(name) and "NFEs" in caption and "saturation" in caption
        assert f"NFEs {row['nfe']:g}" in caption
    assert "Error" not in message
    return stats


def test_api_two_methods(client):
    result = client.predict(prompt=PROMPT, methods=["cfg", "tsg"], steps=STEPS, seed=0, api_name="/generate")
    stats = _check_result(result, ["cfg", "tsg"])
    assert stats[0]["nfe"] == 2 * STEPS  # CFG: two evaluations per step
    assert stats[0]["scale"] == 7.5  # the registry's documented default


def test_api_scale_keyword(client):
    result = client.predict(prompt=PROMPT, methods=["cfgpp"], steps=STEPS, seed=0, scale_cfgpp=0.8,
                            api_name="/generate")
    assert _check_result(result, ["cfgpp"])[0]["scale"] == pytest.approx(0.8)


def test_api_negative_prompt_and_perp_neg(client):
    result = client.predict(prompt=PROMPT, methods=["cfg", "perp_neg"], steps=STEPS, seed=0,
                            negative_prompt="a green square on a white background", api_name="/generate")
    stats = _check_result(result, ["cfg", "perp_neg"])
    assert stats[1]["nfe"] == 3 * STEPS  # empty, negative and conditional rows in one forward
    gallery, stats, message = client.predict(prompt=PROMPT, methods=["perp_neg"], steps=STEPS, seed=0,
                                             api_name="/generate")
    assert gallery == [] and "negative_prompt" in message


def test_concurrent_requests(client):
    def call(i):
        return client.predict(prompt=PROMPT, methods=["cfg", "apg"], steps=STEPS, seed=3,
                              api_name="/generate")

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(call, range(3)))
    stats = [_check_result(r, ["cfg", "apg"]) for r in results]
    # same seed, same settings: the same images whatever the interleaving
    for other in stats[1:]:
        assert [row["saturation"] for row in other] == [row["saturation"] for row in stats[0]]


@pytest.mark.parametrize("kwargs, expected", [
    ({"methods": ["cfgpp"], "scale_cfgpp": 3.0}, "cfgpp: parameter 'scale' must be [0, 1], got 3"),
    ({"methods": ["cfg"], "steps": 0}, "steps: must be an integer in [1, 100]"),
    ({"methods": []}, "select at least one method"),
])
def test_bad_parameter_message(client, kwargs, expected):
    params = {"prompt": PROMPT, "steps": STEPS, "seed": 0, **kwargs}
    gallery, stats, message = client.predict(**params, api_name="/generate")
    assert gallery == [] and stats == []
    assert "Error" in message and expected in message
    assert "Traceback" not in message and "File \"" not in message


def test_methods_and_ranges():
    specs = {spec["name"]: spec for spec in demo_app.scale_sliders_spec()}
    for name in ("cfg", "cfgpp", "apg", "ag", "cfg_zero_star", "icg", "tsg"):
        assert name in demo_app.METHODS
    assert (specs["cfgpp"]["low"], specs["cfgpp"]["high"], specs["cfgpp"]["default"]) == (0.0, 1.0, 0.6)
    assert (specs["cfg"]["low"], specs["cfg"]["high"]) == (0.0, 100.0)


def test_cli_parser():
    import argparse

    from guidance_engine.pipelines.demo_cli import add_demo_parser

    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--port", "7999", "--concurrency", "2"])
    assert (args.host, args.port, args.concurrency, args.model) == ("127.0.0.1", 7999, 2, None)


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} is absent (apt-get install -y chromium chromium-driver)")
def test_browser(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    artifacts = Path(os.environ.get("ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(server[1])
        wait = WebDriverWait(driver, 40)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        box.clear()
        box.send_keys("a green square on a yellow background")

        def checkbox(name):
            return driver.find_element(By.XPATH, f"//*[@id='methods']//label[.//*[normalize-space()='{name}']]"
                                                 f"//input[@type='checkbox']")

        if checkbox("apg").is_selected():
            checkbox("apg").click()
        if not checkbox("tsg").is_selected():
            checkbox("tsg").click()
        assert checkbox("cfg").is_selected() and checkbox("tsg").is_selected()
        steps = driver.find_element(By.CSS_SELECTOR, "#steps input[type='number']")
        steps.clear()
        steps.send_keys(str(STEPS))
        time.sleep(0.3)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def done(d):
            text = d.find_element(By.CSS_SELECTOR, "#message").text
            images = d.find_elements(By.CSS_SELECTOR, "#gallery img")
            return text if len(images) >= 2 and "NFEs" in text else False

        text = WebDriverWait(driver, 60).until(done)
        assert re.search(r"cfg\W+8 NFEs", text), text
        assert "tsg" in text and "saturation" in text and "apg" not in text
        assert "a green square" in driver.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value")
        driver.save_screenshot(str(artifacts / "demo.png"))
        assert (artifacts / "demo.png").stat().st_size > 0
    finally:
        driver.quit()


@pytest.mark.filterwarnings("ignore::UserWarning:gradio.helpers")  # gr.Warning outside a request
def test_class_conditional_model_in_the_demo():
    """With the class-conditional default model the prompt is a class name or id (GFCG runs with
    its guide classifier), the negative prompt is refused, an unknown class names the known ones."""
    import numpy as np
    import torch

    from guidance_engine.pipelines import GuidedDiTPipeline
    from guidance_engine.pipelines.models import default_dit_model_path

    pipe = GuidedDiTPipeline.from_pretrained(default_dit_model_path())
    pipe.set_progress_bar_config(disable=True)
    generate = demo_app.Generator(pipe)
    gallery, stats, message = generate("blue square", ["cfg", "gfcg"], STEPS, 3)
    assert [row["method"] for row in stats] == ["cfg", "gfcg"] and "Error" not in message
    assert [row["nfe"] for row in stats] == [2 * STEPS, 2 * STEPS]
    expected = pipe(["blue square"], guidance="gfcg", num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(3)).images[0]
    shown = gallery[1][0].resize(expected.size, resample=0)  # the nearest-neighbour upscale undone
    assert np.array_equal(np.asarray(shown), np.asarray(expected))
    assert generate("6", ["cfg"], STEPS, 3)[1][0]["nfe"] == 2 * STEPS  # id 6 = blue square
    _, _, message = generate("purple circle", ["cfg"], STEPS, 3)
    assert "class_labels: unknown class name 'purple circle'" in message
    _, _, message = generate("red circle", ["cfg"], STEPS, 3, negative_prompt="blue")
    assert "negative prompt: a class-conditional model generates at its own size" in message
    demo = demo_app.build_demo(pipe=pipe)  # the page asks for a class and hides the negative prompt
    boxes = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert boxes["prompt"].value == "red circle" and boxes["prompt"].label.startswith("class")
    assert boxes["negative-prompt"].visible is False
