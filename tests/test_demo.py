"""The Gradio demo (guidance_engine.pipelines.apps.demo_app): API through gradio_client, the queue under
simultaneous requests, bad input refused (API requests and command lines, tests/demo_bad_inputs.py)
before any model call with a message naming parameter, range and value, and a headless-Chromium
browser run."""

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

from demo_bad_inputs import DEMO_CASES, DEMO_CLI_CASES, markdown_table, request  # noqa: E402, F401
from gradio_client.exceptions import AppError  # noqa: E402

from guidance_engine.pipelines import models  # noqa: E402
from guidance_engine.pipelines.apps import cli, cli_common, demo_app  # noqa: E402

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
    demo.queue(default_concurrency_limit=4)  # no lock inside: four requests really run at once
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
    with pytest.raises(AppError, match="negative_prompt: method 'perp_neg'"):
        client.predict(prompt=PROMPT, methods=["perp_neg"], steps=STEPS, seed=0, api_name="/generate")


def test_a_cut_prompt_is_said_in_the_page(client):
    long = "two small red triangles on a blue background, top left, drawn very carefully in the morning"
    message = client.predict(prompt=long, methods=["cfg"], steps=STEPS, seed=0, api_name="/generate")[2]
    assert "**Warning:** prompt: " in message and "the text encoder reads 16" in message
    short = client.predict(prompt=PROMPT, methods=["cfg"], steps=STEPS, seed=0, api_name="/generate")[2]
    assert "Warning" not in short


def test_four_simultaneous_requests_equal_the_serial_ones(server):
    """Four requests at once (row-altering methods, prompts of different lengths) on the one
    pipeline, without a lock: every image equals that of the same request made alone."""
    import numpy as np
    from PIL import Image

    requests = [("a red circle", ["pag", "tsg"]), ("two small blue squares on a yellow background, top left", ["seg"]),
                ("a green triangle on a white background", ["sag", "apg"]), ("a yellow circle", ["slg", "cfg"])]

    def call(request):
        client = gradio_client.Client(server[1], verbose=False)  # one client per thread, as separate users
        prompt, methods = request
        gallery = client.predict(prompt=prompt, methods=methods, steps=STEPS, seed=5, api_name="/generate")[0]
        return [np.asarray(Image.open(item["image"])) for item in gallery]

    serial = [call(request) for request in requests]
    with ThreadPoolExecutor(4) as pool:
        simultaneous = list(pool.map(call, requests))
    for alone, together in zip(serial, simultaneous):
        assert len(alone) == len(together) and all(np.array_equal(a, b) for a, b in zip(alone, together))


class NoModel:
    """A pipeline stand-in for bad requests: the real scheduler (the checks read it); a call is an error."""

    def __init__(self, scheduler, error: Exception | None = None):
        self.scheduler = scheduler
        self.error = error or AssertionError("a model was called for a bad request")

    def __call__(self, *args, **kwargs):
        raise self.error


@pytest.fixture
def no_model(server, monkeypatch):
    """The server's generator with no model: any model call raises AssertionError."""
    generator = server[0].generator
    monkeypatch.setattr(generator, "pipe", NoModel(generator.pipe.scheduler))

    def refuse(*args, **kwargs):
        raise AssertionError("a model was called for a bad request")

    monkeypatch.setattr(models, "generate_from_prompts", refuse)
    return generator


def _plain(message: str) -> None:
    assert "Traceback" not in message and 'File "' not in message and "\n" not in message, message
    assert "<" not in message and "Error:" not in message, message  # no HTML box, no prefix


@pytest.mark.parametrize("description, changes, expected", DEMO_CASES, ids=[c[0] for c in DEMO_CASES])
def test_bad_request_refused_through_the_api(client, no_model, description, changes, expected):
    """Through Gradio (its preprocessing included): AppError whose message is the one plain line."""
    with pytest.raises(AppError) as refused:
        client.predict(**request(changes), api_name="/generate")
    message = str(refused.value)
    _plain(message)
    assert expected in message, message


@pytest.mark.parametrize("description, changes, expected", DEMO_CASES, ids=[c[0] for c in DEMO_CASES])
def test_bad_request_refused_by_the_handler(no_model, description, changes, expected):
    """The handler itself (no Gradio request): ValueError with the same message."""
    kwargs = request(changes)
    scales = [kwargs.get(f"scale_{name}") for name in demo_app.METHODS]
    with pytest.raises(ValueError) as refused:
        no_model(kwargs["prompt"], kwargs["methods"], kwargs["steps"], kwargs["seed"], *scales,
                 negative_prompt=kwargs.get("negative_prompt"))
    assert expected in str(refused.value)


def test_unexpected_error_is_one_plain_line(client, server, monkeypatch):
    """A failure that is no bad input: its type and text in the page, the traceback in the log only."""
    generator = server[0].generator
    monkeypatch.setattr(generator, "pipe", NoModel(generator.pipe.scheduler, RuntimeError("out of memory")))
    monkeypatch.setattr(models, "generate_from_prompts", lambda pipe, *a, **k: pipe(*a, **k))
    with pytest.raises(AppError) as failed:
        client.predict(prompt=PROMPT, methods=["cfg"], steps=STEPS, seed=0, api_name="/generate")
    assert str(failed.value) == "RuntimeError: out of memory"


def test_page_inputs_are_not_clamped(server):
    """No slider (the page's slider clamps a typed value to its bounds); the number boxes have no
    bounds and pass their value as sent (no rounding to precision)."""
    blocks = list(server[0].blocks.values())
    assert not [b for b in blocks if isinstance(b, gr.Slider)]
    numbers = {b.elem_id: b for b in blocks if isinstance(b, gr.Number)}
    assert {"steps", "seed", "scale-cfg", "scale-cfgpp"} <= set(numbers)
    for box in numbers.values():
        assert box.minimum is None and box.maximum is None
        assert box.preprocess(2.5) == 2.5 and box.preprocess(10**30) == 10**30
    assert "[0, 1]" in numbers["scale-cfgpp"].label
    methods = next(b for b in blocks if getattr(b, "elem_id", None) == "methods")
    assert methods.preprocess(["nope"]) == ["nope"]  # the handler names the parameter and the choices


def test_markdown_table():
    rows = markdown_table().splitlines()
    assert rows[:2] == ["| demo request | refused with |", "|---|---|"]
    assert len(rows) == 2 + len(DEMO_CASES) + len(DEMO_CLI_CASES) and len(DEMO_CASES) >= 14
    assert "| `guidance-engine demo --port 7860` | --port: port 7860 on 127.0.0.1 is in use" in markdown_table()


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("argv, expected", DEMO_CLI_CASES, ids=[" ".join(c[0]) for c in DEMO_CLI_CASES])
def test_bad_command_line_refused_before_the_model_loads(argv, expected, busy_port, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    for name in ("launch", "build_demo", "_load_pipe"):
        monkeypatch.setattr(demo_app, name, no_model)
    monkeypatch.setattr(cli_common, "load_quietly", no_model)
    assert cli.main([a.replace("{busy}", str(busy_port)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("guidance-engine: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected.replace("{busy}", str(busy_port)) in err, err


def test_command_line_port(monkeypatch):
    """--port 0: a free port found here, passed to Gradio; no port: the first free one from 7860."""
    launched = []
    monkeypatch.setattr(demo_app, "launch", lambda **kwargs: launched.append(kwargs))
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    assert cli.main(["demo", "--port", "0"]) == 0 and cli.main(["demo"]) == 0
    assert 0 < launched[0]["port"] < 65536 and 7860 <= launched[1]["port"] < 7960
    assert launched[0]["host"] == "127.0.0.1" and launched[0]["concurrency"] == 1


def test_methods_and_ranges():
    specs = {spec["name"]: spec for spec in demo_app.scale_sliders_spec()}
    for name in ("cfg", "cfgpp", "apg", "ag", "cfg_zero_star", "icg", "tsg"):
        assert name in demo_app.METHODS
    # every registered method (NAG, the anti-burn tools, Rectified-CFG++, ...) but the one that needs a
    # per-model calibration directory
    from guidance_engine.registry import method_names
    assert sorted(demo_app.METHODS) == sorted(set(method_names()) - {"linear_ag"})
    assert (specs["cfgpp"]["low"], specs["cfgpp"]["high"], specs["cfgpp"]["default"]) == (0.0, 1.0, 0.6)
    assert (specs["cfg"]["low"], specs["cfg"]["high"]) == (0.0, 100.0)


def test_cli_parser():
    import argparse

    from guidance_engine.pipelines.apps.demo_cli import add_demo_parser

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

        # a value out of range, typed: refused with its range in a message on the page, not clamped
        steps.clear()
        steps.send_keys("500")
        time.sleep(0.3)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        refused = "steps: must be an integer in [1, 100], got 500"
        WebDriverWait(driver, 30).until(lambda d: refused in d.find_element(By.TAG_NAME, "body").text)
        assert steps.get_attribute("value") == "500"
        driver.save_screenshot(str(artifacts / "demo_refused.png"))
    finally:
        driver.quit()


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
    with pytest.raises(ValueError, match="class_labels: unknown class name 'purple circle'"):
        generate("purple circle", ["cfg"], STEPS, 3)
    with pytest.raises(ValueError, match="negative prompt: a class-conditional model generates at its own size"):
        generate("red circle", ["cfg"], STEPS, 3, negative_prompt="blue")
    with pytest.raises(ValueError, match="methods: 'perp_neg' needs a negative prompt, which a class-conditional"):
        generate("red circle", ["cfg", "perp_neg"], STEPS, 3)
    demo = demo_app.build_demo(pipe=pipe)  # the page asks for a class and hides the negative prompt
    boxes = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert boxes["prompt"].value == "red circle" and boxes["prompt"].label.startswith("class")
    assert boxes["negative-prompt"].visible is False
