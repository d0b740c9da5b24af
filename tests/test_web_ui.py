"""End-to-end tests of the web front end (web/): Debian's Chromium, driven by Playwright, against the
real service (tiny model, SQLite, local object store) serving the built page at /ui/.

One browser for the session, a fresh context (empty session storage) per test. Every request the
page makes is recorded: the page may talk to the service and nothing else, and it must run under
its Content-Security-Policy without a single violation.

`UI_SCREENSHOTS=docs/screenshots` (make screenshots) also writes pictures of the main views.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.helpers import ROOT, app_settings, free_port, image_bytes

CHROMIUM = os.environ.get("UI_CHROMIUM", "/usr/bin/chromium")
DIST = ROOT / "web" / "dist"
SCREENSHOTS = os.environ.get("UI_SCREENSHOTS")
TIMEOUT_MS = 20_000

if shutil.which("node") is None:
    pytest.skip("Node.js is not installed: the web front end cannot be built here", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
expect = playwright_api.expect
expect.set_options(timeout=TIMEOUT_MS)  # a loaded 2-core CI machine: generous, and only spent on failure


# -- the service -------------------------------------------------------------------------------------
@dataclass
class UiServer:
    url: str
    key: str
    app: object

    def api(self, method: str, path: str, key: str | None = None, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory, tiny_engine) -> Iterator[UiServer]:
    from werkzeug.serving import make_server

    from api import create_app
    from api.database import upgrade_schema

    if not (DIST / "index.html").is_file():
        pytest.fail("web/dist is not built: run `make setup` (npm ci + vite build in web/)")
    tmp = tmp_path_factory.mktemp("web-ui")
    settings = app_settings(tmp, AUTH_REQUIRED="true", RATE_LIMIT_DEFAULT="100000/minute",
                            RATE_LIMIT_VIDEO="10000/minute")
    upgrade_schema(f"sqlite:///{tmp / 'instance' / 'd3.sqlite'}")
    app = create_app(settings, engine=tiny_engine)
    _, key = app.extensions["d3"].keys.create("web-ui-test")
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield UiServer(url=f"http://127.0.0.1:{port}", key=key, app=app)
    server.shutdown()
    thread.join(10)


# -- the browser -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: scripts/install-test-deps.sh installs Debian's chromium")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@dataclass
class Recorder:
    origin: str
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def foreign(self) -> list[str]:
        """Requests to anything but the service (blob: and data: are the page's own memory)."""
        return [u for u in self.requests
                if urlsplit(u).scheme not in ("blob", "data") and not u.startswith(self.origin + "/")]


@pytest.fixture
def recorder(ui_server) -> Recorder:
    return Recorder(origin=ui_server.url)


def _new_page(browser, recorder: Recorder, width: int = 1280, height: int = 900):
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=False)
    context.set_default_timeout(TIMEOUT_MS)
    context.on("request", lambda request: recorder.requests.append(request.url))
    page = context.new_page()
    page.on("pageerror", lambda error: recorder.problems.append(f"page error: {error}"))

    def on_console(message) -> None:
        text = message.text
        if "Content Security Policy" in text or "Content-Security-Policy" in text:
            recorder.problems.append(f"CSP: {text}")
        elif message.type == "error" and "Failed to load resource" not in text:
            recorder.problems.append(f"console error: {text}")

    page.on("console", on_console)
    return context, page


@pytest.fixture
def page(browser, recorder):
    context, page = _new_page(browser, recorder)
    yield page
    context.close()
    assert recorder.foreign() == [], f"the page made requests to other hosts: {recorder.foreign()}"
    assert recorder.problems == []


def shot(page, name: str, full_page: bool = True) -> None:
    if SCREENSHOTS:
        target = Path(SCREENSHOTS)
        target.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target / f"{name}.png"), full_page=full_page)


def open_ui(page, server: UiServer, route: str = "check", key: str | None = None) -> None:
    page.goto(f"{server.url}/ui/#/{route}")
    if key is not None:
        page.get_by_label("API key", exact=True).fill(key)
        page.get_by_role("button", name="Use key").click()
        expect(page.get_by_text("Key set for this tab")).to_be_visible()


def file_payload(name: str, data: bytes, mime: str) -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


# -- the tests ---------------------------------------------------------------------------------------
def test_ui_is_served_with_a_strict_content_security_policy(ui_server):
    page = requests.get(ui_server.url + "/ui/", timeout=10)
    assert page.status_code == 200 and '<div id="root">' in page.text
    csp = page.headers["Content-Security-Policy"]
    directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert directives["default-src"] == "'self'" and directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline for the CSP to refuse
    assert requests.get(ui_server.url + "/", allow_redirects=False, timeout=10).headers["Location"].endswith("/ui/")


def test_image_upload_shows_the_verdict_threshold_model_and_caution(page, ui_server, recorder):
    open_ui(page, ui_server, key=ui_server.key)
    page.get_by_label("Images, a video or an audio file").set_input_files(
        file_payload("portrait.png", image_bytes(seed=101), "image/png"))
    page.get_by_label("Threshold").fill("0.4")
    page.get_by_role("button", name="Check", exact=True).click()
    result = page.get_by_test_id("result")
    expect(result).to_be_visible()

    # What the page shows is what the service stored for this key.
    stored = ui_server.api("GET", "/predictions", params={"filename": "portrait.png"}).json()["results"][0]
    assert stored["threshold"] == 0.4
    expect(result.get_by_test_id("probability")).to_have_text(f"{stored['fake_probability']:.3f}")
    expect(result.get_by_test_id("threshold")).to_have_text("0.4")
    expect(result.get_by_test_id("model-version")).to_have_text(stored["model_version"])
    verdict = "Likely AI-generated (fake)" if stored["prediction"] == "fake" else "Likely real"
    expect(result.get_by_test_id("verdict")).to_have_text(verdict)
    expect(result.get_by_test_id("caution")).to_contain_text("untrained")  # the tiny model is random
    expect(page.get_by_test_id("banner-untrained")).to_be_visible()
    # The provenance block, beside the verdict: a generated PNG carries no metadata claim.
    assert stored["provenance"]["declared_ai"] is None
    expect(result.get_by_test_id("declared")).to_contain_text("makes no claim")
    expect(result.get_by_test_id("c2pa")).to_have_text("no Content Credentials")
    # The key went as a Bearer header, and stays in session storage only.
    assert page.evaluate("sessionStorage.getItem('d3.apiKey')") == ui_server.key
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
    shot(page, "check-image")


def test_many_images_go_in_one_batch_and_a_bad_one_gets_its_own_message(page, ui_server):
    open_ui(page, ui_server, key=ui_server.key)
    page.get_by_label("Images, a video or an audio file").set_input_files([
        file_payload("batch-a.png", image_bytes(seed=201), "image/png"),
        file_payload("batch-b.jpg", image_bytes("JPEG", seed=202), "image/jpeg"),
        file_payload("batch-notes.png", b"these are notes, not an image", "image/png"),
    ])
    with page.expect_request(lambda r: r.url.endswith("/predict/batch?threshold=0.5")):
        page.get_by_role("button", name="Check", exact=True).click()
    expect(page.get_by_test_id("result")).to_have_count(2)
    error = page.get_by_test_id("error")
    expect(error).to_have_count(1)
    expect(error).to_have_attribute("data-status", "415")
    expect(error).to_contain_text("batch-notes.png")
    expect(error).to_contain_text("This type of file is not supported")


def _video_clip(tmp_path: Path, frames: int = 24) -> bytes:
    from tests.video_clips import clip_bytes

    # VP8 in WebM: a codec Chromium decodes, so the player and the thumbnails work too.
    return clip_bytes(tmp_path, "VP80", 8.0, [(i * 37) % 250 for i in range(frames)], size=(96, 64), name="ui")


def test_video_upload_draws_an_interactive_timeline(page, ui_server, tmp_path):
    clip = _video_clip(tmp_path)
    # A threshold between the frames' scores, so that some stretches are over it and get shaded.
    probe = ui_server.api("POST", "/predict/video", files={"file": ("probe.webm", clip)})
    assert probe.status_code == 200, probe.text
    scores = sorted(f["fake_probability"] for f in probe.json()["frames"])
    threshold = round((scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2, 6)

    open_ui(page, ui_server, key=ui_server.key)
    page.get_by_label("Images, a video or an audio file").set_input_files(file_payload("clip.webm", clip, "video/webm"))
    page.get_by_label("Threshold").fill(str(threshold))
    page.get_by_role("button", name="Check", exact=True).click()
    result = page.get_by_test_id("result")
    expect(result.get_by_test_id("timeline")).to_be_visible()

    listed = ui_server.api("GET", "/predictions", params={"filename": "clip.webm", "media_type": "video"}).json()
    stored = ui_server.api("GET", f"/predictions/{listed['results'][0]['id']}").json()
    assert stored["segments"], "the threshold was chosen so that some frames are over it"
    points = result.get_by_test_id("timeline-point")
    expect(points).to_have_count(len(stored["frames"]))
    expect(result.get_by_test_id("timeline-segment")).to_have_count(len(stored["segments"]))
    expect(result.get_by_test_id("segments").locator("li")).to_have_count(len(stored["segments"]))
    expect(result.get_by_test_id("top-frame-image")).to_have_count(len(stored["top_frames"]))

    # Hover a point: its time and score. Click: the player jumps there.
    frame = stored["frames"][3]
    point = points.nth(3)
    point.hover()
    readout = result.get_by_test_id("timeline-readout")
    expect(readout).to_contain_text(f"fake probability {frame['fake_probability']:.3f}")
    expect(result.get_by_test_id("timeline-tooltip")).to_contain_text(f"p = {frame['fake_probability']:.3f}")
    point.click()
    player = result.get_by_test_id("player")
    page.wait_for_function("([el, t]) => Math.abs(el.currentTime - t) < 0.05",
                           arg=[player.element_handle(), frame["timestamp_s"]])
    shot(page, "check-video")

    # The keyboard does the same: focus, step with the arrow keys, Enter seeks.
    timeline = result.get_by_test_id("timeline")
    timeline.focus()
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    second = stored["frames"][2]
    expect(readout).to_contain_text(f"fake probability {second['fake_probability']:.3f}")
    page.keyboard.press("Enter")
    page.wait_for_function("([el, t]) => Math.abs(el.currentTime - t) < 0.05",
                           arg=[player.element_handle(), second["timestamp_s"]])


def test_async_video_job_shows_progress_then_the_result(page, ui_server, tmp_path):
    clip = _video_clip(tmp_path, frames=16)
    statuses: list[tuple[str, int]] = []
    page.on("response", lambda r: statuses.append((urlsplit(r.url).path, r.status)))
    open_ui(page, ui_server, key=ui_server.key)
    page.get_by_label("Images, a video or an audio file").set_input_files(file_payload("job.webm", clip, "video/webm"))
    page.get_by_label("Videos and audio as a background job (live progress)").check()
    page.get_by_role("button", name="Check", exact=True).click()
    result = page.get_by_test_id("result")
    expect(result.get_by_test_id("timeline")).to_be_visible()
    assert ("/predict/video", 202) in statuses  # queued as a job ...
    polls = [path for path, status in statuses if path.startswith("/predictions/") and status == 200]
    assert polls, "... and the page polled GET /predictions/<id> until it was done"
    job_id = polls[-1].rsplit("/", 1)[1]
    stored = ui_server.api("GET", f"/predictions/{job_id}").json()
    assert stored["status"] == "done" and stored["filename"] == "job.webm"
    expect(result.get_by_test_id("timeline-point")).to_have_count(len(stored["frames"]))


def test_history_filters_and_pages_with_the_cursor(page, ui_server):
    names = [f"hist-{i:02d}.png" for i in range(12)]
    files = [("files", (name, image_bytes(seed=300 + i))) for i, name in enumerate(names)]
    files.append(("files", ("elsewhere.png", image_bytes(seed=399))))
    created = ui_server.api("POST", "/predict/batch", files=files)
    assert created.status_code == 200 and created.json()["failed"] == 0
    expected = [r["filename"] for r in ui_server.api("GET", "/predictions", params={"filename": "hist-", "limit": 100})
                .json()["results"]]
    assert sorted(expected) == names

    open_ui(page, ui_server, key=ui_server.key)
    page.get_by_role("link", name="History").click()
    page.get_by_label("File name contains").fill("hist-")
    page.get_by_role("button", name="Apply filters").click()
    summary = page.get_by_test_id("history-summary")
    expect(summary).to_have_text("Showing 1–10 of 12 (page 1).")
    links = page.get_by_test_id("history-link")
    assert links.all_inner_texts() == expected[:10]
    shot(page, "history")
    page.get_by_role("button", name="Next page").click()
    expect(summary).to_have_text("Showing 11–12 of 12 (page 2).")
    assert links.all_inner_texts() == expected[10:]
    expect(page.get_by_role("button", name="Next page")).to_be_disabled()
    page.get_by_role("button", name="Previous page").click()
    expect(summary).to_have_text("Showing 1–10 of 12 (page 1).")

    # A second filter on top: the verdict. Same rows as the API gives for the same query.
    fakes = ui_server.api("GET", "/predictions",
                          params={"filename": "hist-", "prediction": "fake", "limit": 100}).json()
    page.get_by_label("Verdict").select_option("fake")
    page.get_by_role("button", name="Apply filters").click()
    if fakes["total"] == 0:
        expect(summary).to_have_text("No predictions match.")
    else:
        expect(summary).to_contain_text(f"of {fakes['total']} (page 1)")
        assert links.all_inner_texts() == [r["filename"] for r in fakes["results"]][:10]

    # The detail view: the stored JSON and the result link.
    page.get_by_label("Verdict").select_option("")
    page.get_by_role("button", name="Apply filters").click()
    expect(summary).to_contain_text("of 12")
    links.first.click()
    record = ui_server.api("GET", "/predictions", params={"filename": expected[0]}).json()["results"][0]
    expect(page.get_by_test_id("record-json")).to_contain_text(f'"id": "{record["id"]}"')
    expect(page.get_by_test_id("record-json")).to_contain_text(f'"sha256": "{record["sha256"]}"')
    link = page.get_by_test_id("result-link").get_attribute("href")
    assert urlsplit(link).path == urlsplit(record["result_url"]).path
    assert requests.get(link, timeout=10).json()["id"] == record["id"]  # the link opens the stored result
    shot(page, "detail")


def test_stats_page_charts_what_the_service_counts(page, ui_server):
    ui_server.api("POST", "/predict", files={"file": ("stats.png", image_bytes(seed=501))})
    stats = ui_server.api("GET", "/predictions/stats").json()
    open_ui(page, ui_server, route="stats", key=ui_server.key)
    expect(page.get_by_test_id("stats-total")).to_have_text(f"{stats['total']} predictions")
    expect(page.get_by_test_id("chart-per-day").get_by_test_id("chart-bar")).to_have_count(len(stats["per_day"]))
    legend = page.get_by_test_id("chart-verdicts").locator(".legend")
    expect(legend).to_contain_text(f"fake: {stats['by_prediction'].get('fake', 0)}")
    expect(legend).to_contain_text(f"real: {stats['by_prediction'].get('real', 0)}")
    expect(page.get_by_test_id("chart-times").get_by_test_id("chart-bar")).to_have_count(10)  # ten bins
    shot(page, "stats")


def test_a_wrong_key_gets_the_401_message(page, ui_server):
    wrong = ui_server.key[:-6] + ("AAAAAA" if not ui_server.key.endswith("AAAAAA") else "BBBBBB")
    open_ui(page, ui_server, route="history", key=wrong)
    error = page.get_by_test_id("error")
    expect(error).to_have_attribute("data-status", "401")
    expect(error).to_contain_text("Your API key was not accepted")
    expect(error).to_contain_text("the API key is not valid")
    page.get_by_role("link", name="Check").click()
    page.get_by_label("Images, a video or an audio file").set_input_files(
        file_payload("nokey.png", image_bytes(seed=601), "image/png"))
    page.get_by_role("button", name="Check", exact=True).click()
    expect(page.get_by_test_id("error")).to_contain_text("Enter a valid API key")
    shot(page, "error-401")


def test_the_page_fits_a_phone_screen(browser, recorder, ui_server):
    context, page = _new_page(browser, recorder, width=390, height=844)
    try:
        open_ui(page, ui_server, key=ui_server.key)
        page.get_by_label("Images, a video or an audio file").set_input_files(
            file_payload("phone.png", image_bytes(seed=701), "image/png"))
        page.get_by_role("button", name="Check", exact=True).click()
        expect(page.get_by_test_id("result")).to_be_visible()
        wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter((e) => e.getBoundingClientRect().right > 391)
            .map((e) => e.tagName + '.' + e.className).slice(0, 5)""")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, wide  # no sideways scrolling
        shot(page, "phone-check")
        page.get_by_role("link", name="History").click()
        expect(page.get_by_test_id("history-table")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()
    assert recorder.foreign() == [] and recorder.problems == []


AXE = ROOT / "web" / "node_modules" / "axe-core" / "axe.min.js"


def test_the_main_views_pass_an_automated_accessibility_audit(browser, ui_server):
    """axe-core (labels, names, contrast, landmarks, ARIA) on the Check result, History and Stats.

    The audit script is injected into the page, which the page's own CSP would rightly refuse:
    this context alone bypasses the CSP (the other tests prove the page works under it).
    """
    if not AXE.exists():
        pytest.fail("web/node_modules/axe-core is missing: run `make setup` (npm ci in web/)")
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        open_ui(page, ui_server, key=ui_server.key)
        page.get_by_label("Images, a video or an audio file").set_input_files(
            file_payload("audit.png", image_bytes(seed=801), "image/png"))
        page.get_by_role("button", name="Check", exact=True).click()
        expect(page.get_by_test_id("result")).to_be_visible()
        found = {}
        for route, ready in (("check", "result"), ("history", "history-table"), ("stats", "stats-total")):
            if route != "check":
                page.get_by_role("link", name=route.capitalize(), exact=True).click()
            expect(page.get_by_test_id(ready).first).to_be_visible()
            page.add_script_tag(path=str(AXE))
            result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
            found[route] = [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
                            for v in result["violations"]]
        assert found == {"check": [], "history": [], "stats": []}
    finally:
        context.close()
