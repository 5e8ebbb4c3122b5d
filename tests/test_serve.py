"""`diffxattn serve`: the run queue, the command-line builder, the HTTP guard, and the page in headless Chromium
against a server started in-process on a free port with a tiny pipeline."""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffxattn.browser import SKIP_REASON, chromium, chromium_available
from diffxattn.serve.queue import Cancelled, RunQueue
from diffxattn.serve.request import Defaults, FieldError, RunRequest, command_line

pytest.importorskip("starlette", reason="pip install -e .[serve]")
pytest.importorskip("uvicorn", reason="pip install -e .[serve]")

from diffxattn.serve.app import LiveApp, refuse, running  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = Defaults(steps=4, guidance=1.0, sampler="ddim", samplers=("ddim", "euler"))


# --- the queue ------------------------------------------------------------------------------------

def slow_queue(steps: int = 50, delay: float = 0.01):
    started = []

    def execute(run):
        started.append(run.request)
        for i in range(steps):
            time.sleep(delay)
            run.step(i + 1, steps)
        return {"value": run.request}

    return RunQueue(execute), started


def final(run, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        events = run.events_after(0, 0.1)
        if events[-1]["type"] in ("done", "failed", "cancelled"):
            return events[-1]
    raise AssertionError(f"run {run.id} did not finish: {run.events}")


def test_queue_newest_wins_and_superseded_runs_stop_at_their_next_step():
    queue, started = slow_queue()
    try:
        first = queue.submit("first")
        first.events_after(2, 5)  # running and at least one step done
        burst = [queue.submit(f"drag {k}") for k in range(20)]  # a slider dragged across 20 values
        last = burst[-1]
        assert final(last)["type"] == "done" and last.result == {"value": "drag 19"}
        assert final(first) == {"type": "cancelled", "run": first.id, "reason": f"superseded by run {burst[0].id}"}
        steps_done = [e for e in first.events if e["type"] == "progress"]
        assert len(steps_done) < 50  # stopped early, at a step
        assert all(final(r)["type"] == "cancelled" for r in burst[:-1])
        assert started[0] == "first" and started[-1] == "drag 19" and len(started) <= 3  # 21 requests, <= 3 runs
    finally:
        queue.close()


def test_queue_cancel_stops_a_running_run_and_a_failed_run_keeps_the_worker():
    calls = []

    def execute(run):
        calls.append(run.request)
        if run.request == "boom":
            raise ValueError("bad prompt")
        for i in range(200):
            time.sleep(0.005)
            run.step(i + 1, 200)
        return {}

    queue = RunQueue(execute, keep=3)
    try:
        run = queue.submit("slow")
        run.events_after(2, 5)
        assert queue.cancel(run.id)
        assert final(run) == {"type": "cancelled", "run": run.id, "reason": "cancelled"}
        failed = queue.submit("boom")
        assert final(failed) == {"type": "failed", "run": failed.id, "message": "bad prompt"}
        runs = [queue.submit("boom") for _ in range(10)]
        final(runs[-1])
        assert queue.get(runs[-1].id) is runs[-1] and queue.get(run.id) is None  # only the newest `keep` kept
        assert len(queue._runs) <= 3 + 1
    finally:
        queue.close()
    with pytest.raises(Cancelled):
        run.step(1, 1)


# --- requests and the command line ------------------------------------------------------------------

def test_command_line_reproduces_the_request_and_parses_back():
    from diffxattn.cli import parser

    request = RunRequest.from_json({"prompt": "a (red:1.5) circle's \"$HOME\"", "seed": "7", "steps": 12,
                                    "guidance": "3.5", "sampler": "euler", "weight_mode": "embedding"}, DEFAULTS)
    line = command_line(request, pipeline="my pipes/p")
    assert line.startswith("diffxattn generate ")
    args = parser().parse_args(shlex.split(line)[1:])
    assert (args.prompt, args.seed, args.steps, args.guidance, args.scheduler, args.weight_mode, args.pipeline) == (
        "a (red:1.5) circle's \"$HOME\"", 7, 12, 3.5, "euler", "embedding", "my pipes/p")
    edit = RunRequest.from_json({"kind": "edit", "prompt": "a red circle", "to": "a blue circle", "local_blend": "red blue",
                                 "feature_injection": True, "cross_replace": 0.6}, DEFAULTS)
    line = command_line(edit)
    assert line == ("diffxattn edit 'a red circle' --to 'a blue circle' --seed 0 --steps 4 --guidance 1 --scheduler ddim "
                    "--cross-replace 0.6 --local-blend red blue --feature-replace 0.8 -o edit.png")
    args = parser().parse_args(shlex.split(line)[1:])
    assert args.local_blend == ["red", "blue"] and args.feature_replace == "0.8" and args.pipeline is None


@pytest.mark.parametrize("data,field,text", [
    ({"prompt": "a (red circle"}, "prompt", "column 2: "),
    ({"prompt": "a red circle", "steps": 0}, "steps", "steps=0 must be a whole number >= 1"),
    ({"prompt": "a red circle", "steps": 10**6}, "steps", "over the limit"),
    ({"prompt": "a red circle", "guidance": "nan"}, "guidance", "must be a number in [1, 100]"),
    ({"prompt": "a red circle", "sampler": "../../etc"}, "sampler", "expected one of ddim, euler"),
    ({"prompt": "a red circle", "weights": {"1": 11}}, "weights", "expected a number from 0 to 10"),
    ({"prompt": " "}, "prompt", "type a prompt"),
    ({"kind": "edit", "prompt": "a (red:2) circle", "to": "a blue circle"}, "prompt", "has no weights"),
    ({"kind": "edit", "prompt": "a red circle", "to": "a [blue circle"}, "to", "column 2: "),
])
def test_bad_requests_name_the_field(data, field, text):
    with pytest.raises(FieldError) as e:
        RunRequest.from_json(data, DEFAULTS)
    assert e.value.field == field and text in str(e.value)


def test_word_weights_are_written_into_the_prompt(tiny_pipe):
    from diffxattn.conditioning import TokenizedPrompt, with_word_weights

    tok = tiny_pipe.tokenizer
    assert with_word_weights(tok, "a red circle", {1: 1.5}) == "a (red:1.5) circle"
    prompt = with_word_weights(tok, "a red++ circle (at:0.5) the left", {2: 0.25})
    assert prompt == "a (red:1.21) (circle:0.25) (at:0.5) the left"
    weights = TokenizedPrompt.of(tok, prompt).word_weights()
    assert weights == {"red": pytest.approx(1.21), "circle": 0.25, "at": 0.5}
    assert with_word_weights(tok, r"a C\+\+ circle:", {}) == r"a C\+\+ circle\:"  # literal syntax stays literal


# --- the server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_pipe(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "pipe"
    tiny_pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def server(saved_pipe):
    with running(LiveApp(saved_pipe)) as url:
        yield url


def http(url: str, body: dict | None = None, headers: dict | None = None, method: str | None = None):
    data = None if body is None else json.dumps(body).encode()
    headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run_to_end(server: str, body: dict) -> tuple[dict, list[dict]]:
    status, answer = http(server + "api/runs", body)
    assert status == 200, answer
    run = json.loads(answer)["run"]
    events, result = [], None
    with urllib.request.urlopen(f"{server}api/runs/{run}/events", timeout=60) as stream:
        kind = None
        for line in stream:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                events.append({"type": kind, **({} if kind == "done" else data)})
                if kind == "done":
                    result = data
    return result, events


def test_foreign_origin_and_host_are_refused(server):
    status, page = http(server)
    assert status == 200 and b"loading model" in page
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Host": "evil.example:80"},
                    {"Origin": server.rstrip("/").replace("127.0.0.1", "localhost:1")}):
        for url, body in ((server, None), (server + "api/runs", {"prompt": "a red circle"}),
                          (server + "api/status", None)):
            status, answer = http(url, body, headers)
            assert status == 403, (headers, url)
            assert b"refused" in answer or b"not this server" in answer
    status, _ = http(server + "api/status", None, {"Origin": server.rstrip("/")})  # its own page: allowed
    assert status == 200
    status, _ = http(server + "api/status", None, {"Host": "localhost:" + server.rsplit(":", 1)[1].strip("/")})
    assert status == 200
    assert refuse("127.0.0.1:7860", "http://127.0.0.1:7860", {"127.0.0.1:7860"}) is None


def test_no_request_names_a_server_file(server):
    for path in ("api/runs/1/..%2F..%2Fetc%2Fpasswd", "api/runs/1/README.md", "../README.md", "pipelines/shapes-32",
                 "api/runs/999/image.png"):
        status, body = http(server + path)
        assert status == 404 and b"root:" not in body
    status, body = http(server + "api/runs", None, {"Content-Type": "text/plain"}, method="POST")
    assert status == 415


def test_the_image_is_what_its_command_line_makes(server, tmp_path):
    from diffxattn.cli import main

    http(server + "api/status?wait=20")
    result, events = run_to_end(server, {"prompt": "a red circle", "seed": 3, "steps": 3, "guidance": 2})
    assert [e["type"] for e in events] == ["queued", "running", "progress", "progress", "progress", "done"]
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3]
    line = result["command"]
    assert "--seed 3 --steps 3 --guidance 2" in line and "--pipeline" in line
    out = tmp_path / "out.png"
    assert main(shlex.split(line)[1:-1] + [str(out)]) == 0  # -o out.png -> -o tmp/out.png
    status, png = http(f"{server}api/runs/{result['run']}/image.png")
    assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(out)))
    status, meta = http(f"{server}api/runs/{result['run']}/maps.json")
    meta = json.loads(meta)
    assert meta["words"] == ["a", "red", "circle"] and meta["seed"] == 3
    from safetensors.torch import load as load_tensors

    status, raw = http(f"{server}api/runs/{result['run']}/maps.safetensors")
    tensors = load_tensors(raw)
    assert tensors["tokens"].shape[1:] == (16, 16) and tensors["steps"].shape[0] == len(meta["step_bins"])


# --- in headless Chromium --------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(not chromium_available(), reason=SKIP_REASON)


@pytest.fixture(scope="module")
def page(server):
    pytest.importorskip("selenium", reason="selenium not installed (pip install -e .[test])")
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium(width=1280, height=1400) as driver:
        driver.get(server)
        WebDriverWait(driver, 20).until(lambda d: d.execute_script("return window.appState && window.appState.ready"))
        yield driver


def wait(driver, js: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(js))


def generate_in_page(driver, prompt: str | None = None) -> None:
    runs = driver.execute_script("return window.appState.runs")
    if prompt is not None:
        box = driver.find_element("id", "prompt-input")
        box.clear()
        box.send_keys(prompt)
    driver.find_element("id", "generate").click()
    wait(driver, f"return window.appState.runs > {runs} && window.appState.shown === window.appState.result.run")


def image_pixels(driver, element_id: str) -> np.ndarray:
    src = driver.find_element("id", element_id).get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def overlay(driver) -> str:
    return driver.execute_script("return document.getElementById('overlay').toDataURL()")


@needs_chromium
def test_typing_a_prompt_shows_its_image_and_words(page, server):
    page.find_element("id", "steps").clear()
    page.find_element("id", "steps").send_keys("3")
    generate_in_page(page, "a red circle at the left")
    image = image_pixels(page, "raw")
    assert image.shape == (16, 16, 3) and image.std() > 1  # a sampled image, not the blank placeholder
    chips = page.execute_script("return Array.from(document.querySelectorAll('#words .chip'), e => e.textContent)")
    assert chips == ["a", "red", "circle", "at", "the", "left"]
    assert page.find_element("id", "progress").get_attribute("value") == "3"
    assert page.find_element("id", "progress-text").text == "done"
    assert "diffxattn generate 'a red circle at the left' --pipeline" in page.find_element("id", "command").text
    status, png = http(server.rstrip("/") + page.find_element("id", "dl-image").get_attribute("pathname"))
    assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(png))), image)
    assert page.execute_script("return performance.getEntriesByType('resource')"
                               ".every(e => e.name.startsWith(location.origin))")


@needs_chromium
def test_clicking_a_word_shows_its_heatmap(page):
    if not page.execute_script("return window.appState.result"):
        generate_in_page(page, "a red circle at the left")
    chips = page.find_elements("css selector", "#words .chip")
    chips[2].click()
    circle = overlay(page)
    assert page.find_element("id", "caption").text.startswith("\u201ccircle\u201d")
    chips[5].click()
    assert page.find_element("id", "overlay").get_attribute("data-word") == "5"
    assert overlay(page) != circle and page.find_element("id", "caption").text.startswith("\u201cleft\u201d")
    left = overlay(page)
    page.find_element("id", "step").send_keys("\ue011")  # the viewer's step slider: the first step bin only
    assert "steps 0\u20130 summed" in page.find_element("id", "caption").text and overlay(page) != left


@needs_chromium
def test_moving_a_weight_regenerates_and_the_command_shows_it(page):
    generate_in_page(page, "a red circle at the left")
    before, runs = image_pixels(page, "raw"), page.execute_script("return window.appState.runs")
    page.execute_script("const s = document.querySelector('#weights input[data-word=\"1\"]');"
                        "s.value = '1.8'; s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));")
    wait(page, f"return window.appState.runs > {runs} && window.appState.shown === window.appState.result.run")
    assert page.find_element("id", "prompt-input").get_attribute("value") == "a (red:1.8) circle at the left"
    assert "diffxattn generate 'a (red:1.8) circle at the left'" in page.find_element("id", "command").text
    assert "--seed 0" in page.find_element("id", "command").text
    assert not np.array_equal(image_pixels(page, "raw"), before)
    slider = page.find_element("css selector", '#weights input[data-word="1"]')
    assert slider.get_attribute("value") == "1.8"


@needs_chromium
def test_an_edit_shows_source_and_edit_side_by_side(page):
    page.find_element("id", "prompt-input").clear()
    page.find_element("id", "prompt-input").send_keys("a red circle at the left")
    page.find_element("id", "edit-to").clear()
    page.find_element("id", "edit-to").send_keys("a blue circle at the left")
    page.find_element("id", "blend").send_keys("red blue")
    runs = page.execute_script("return window.appState.runs")
    page.find_element("id", "edit").click()
    wait(page, f"return window.appState.runs > {runs} && window.appState.result.kind === 'edit'")
    wait(page, "return document.getElementById('edited-image').naturalWidth === 16")
    assert page.find_element("id", "pair").is_displayed()
    source, edited = image_pixels(page, "source-image"), image_pixels(page, "edited-image")
    assert source.shape == edited.shape == (16, 16, 3) and not np.array_equal(source, edited)
    assert "diffxattn edit 'a red circle at the left' --to 'a blue circle at the left'" in \
        page.find_element("id", "command").text
    assert "--local-blend red blue" in page.find_element("id", "command").text


@needs_chromium
def test_a_bad_prompt_shows_the_column_and_the_server_keeps_serving(page):
    errors = page.execute_script("return window.appState.errors")
    box = page.find_element("id", "prompt-input")
    box.clear()
    box.send_keys("a (red:1.5 circle <b>x</b>")
    page.find_element("id", "generate").click()
    wait(page, f"return window.appState.errors > {errors}")
    shown = page.find_element("id", "prompt-error")
    assert shown.is_displayed() and shown.text.startswith("column 2: ")
    assert page.execute_script("return document.querySelectorAll('#prompt-error *').length") == 0  # text, not HTML
    page.find_element("id", "steps").clear()
    page.find_element("id", "steps").send_keys("0")
    generate_in_page_error = page.execute_script("return window.appState.errors")
    box.clear()
    box.send_keys("a red circle")
    page.find_element("id", "generate").click()
    wait(page, f"return window.appState.errors > {generate_in_page_error}")
    assert "steps=0 must be a whole number >= 1" in page.find_element("id", "message").text
    page.find_element("id", "steps").clear()
    page.find_element("id", "steps").send_keys("2")
    generate_in_page(page, "a red circle")
    assert not page.find_element("id", "prompt-error").is_displayed()


# --- the command ------------------------------------------------------------------------------------

def test_help_loads_no_torch():
    code = "import sys, diffxattn.cli; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stderr
    r = subprocess.run([sys.executable, "-m", "diffxattn.cli", "serve", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "--host" in r.stdout and "--port" in r.stdout


def test_serve_prints_its_url_answers_while_loading_and_stops_on_ctrl_c(saved_pipe):
    proc = subprocess.Popen([sys.executable, "-m", "diffxattn.cli", "serve", "--pipeline", saved_pipe, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("diffxattn serve: http://127.0.0.1:"), line
        url = line.split()[2]
        status, page = http(url)
        assert status == 200 and b"mountViewer" in page
        status, answer = http(url + "api/status?wait=30")
        assert json.loads(answer)["ready"] is True
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "stopped" in out and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
