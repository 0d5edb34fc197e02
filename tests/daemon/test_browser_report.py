"""A real generation's report and the lineage page, checked in a real browser.

Debian's Chromium (installed here by a session fixture if missing) runs headless and is driven over the
Chrome DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated JSON on file descriptors
3 and 4, so neither a websocket library nor a browser download is needed). Each page is loaded from
disk; the test records console messages, exceptions and every network request, checks that the key
elements are laid out and visible, and saves a full-page screenshot under ``test-artifacts/browser/``.
If Chromium cannot be installed or started, the tests fail: they never skip.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selftune.daemon.context import Context
from selftune.daemon.reports.lineage import lineage_rows, render_lineage_html
from selftune.daemon.reports.render import write_reports

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
SELFTUNE = str(Path(sys.executable).with_name("selftune"))
SAMPLES = ROOT / "data" / "sample"
FAST = {  # a tiny model and a few steps: the pages, not the model, are under test here
    "SELFTUNE_REPLAY__REHEARSAL": "0",  # the untrained tiny model ends no answer: no rehearsal row would be kept
    "SELFTUNE_TRAIN__STEPS": "12", "SELFTUNE_TRAIN__BATCH_SIZE": "4", "SELFTUNE_TRAIN__MAX_LENGTH": "96",
    "SELFTUNE_TRAIN__LEARNING_RATE": "0.003", "SELFTUNE_TRAIN__THREADS": "1", "SELFTUNE_CYCLE__MAX_EVAL_ROWS": "16",
    "SELFTUNE_CYCLE__SAMPLE_ANSWERS": "3", "SELFTUNE_EWC__FISHER_EXAMPLES": "8",
    "SELFTUNE_GATES__MIN_DECODE_SPEED_RATIO": "0",  # a tiny model's decode speed is noise
    "SELFTUNE_GATES__MIN_NEW_DATA_IMPROVEMENT": "0",
    "SELFTUNE_GATES__MAX_EXPERIENCE_REGRESSION": "10", "SELFTUNE_GATES__MAX_FOUNDATION_REGRESSION": "10",
    "SELFTUNE_GATES__MAX_FOUNDATION_DRIFT": "10",  # promote both generations, so the second has a parent to compare
}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio",
                  "--hide-scrollbars", "--remote-debugging-pipe")
VIEWPORT = {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}


# -- Chromium over the DevTools protocol ----------------------------------------------------------------


class Chromium:
    """Headless Chromium with one DevTools connection on a pipe; events are kept for later inspection."""

    def __init__(self, executable: str, profile: Path, log: Path) -> None:
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()

        def wire_pipes() -> None:
            """In the child: the protocol's fds are 3 (commands in) and 4 (replies out); nothing else is inherited."""
            commands, replies = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
            os.dup2(commands, 3)
            os.dup2(replies, 4)
            os.closerange(5, os.sysconf("SC_OPEN_MAX"))

        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                        preexec_fn=wire_pipes, close_fds=False)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.events = b"", 0, []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and wait for its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, since: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        """The first event ``method`` of the session from ``self.events[since]`` on (received or still to come)."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._receive(deadline, method))

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                raise TimeoutError(f"Chromium gave no answer to {waiting_for} (exit code {self.process.poll()}); "
                                   f"its log: {self._log.name}")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the DevTools pipe; its log: {self._log.name}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._log.close()


class Page:
    """One tab: load a URL, evaluate JavaScript, take a full-page screenshot, list what went wrong."""

    def __init__(self, browser: Chromium) -> None:
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=self.session)
        browser.send("Emulation.setDeviceMetricsOverride", VIEWPORT, session=self.session)

    def open(self, url: str) -> None:
        since = len(self.browser.events)
        navigation = self.browser.send("Page.navigate", {"url": url}, session=self.session)
        assert "errorText" not in navigation, navigation
        self.browser.wait_for("Page.loadEventFired", self.session, since)

    def evaluate(self, expression: str) -> Any:
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, session=self.session)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        size = self.browser.send("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                            "clip": clip}, session=self.session)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and error log entries of this tab."""
        out = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                out.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
            elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
                out.append(f"log {params['entry']['level']}: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.browser.events
                if e.get("sessionId") == self.session and e.get("method") == "Network.requestWillBeSent"]

    def layout(self, selectors: list[str]) -> dict[str, dict[str, Any]]:
        """For each selector: found, laid out with a size, visible, and (for images) decoded."""
        script = """(selectors => Object.fromEntries(selectors.map(sel => {
            const el = document.querySelector(sel);
            if (!el) return [sel, {found: false}];
            const box = el.getBoundingClientRect(), style = getComputedStyle(el);
            return [sel, {found: true, width: box.width, height: box.height,
                          visible: style.display !== 'none' && style.visibility !== 'hidden' && box.width > 0 && box.height > 0,
                          image: el.tagName === 'IMG' ? {complete: el.complete, width: el.naturalWidth} : null,
                          text: el.innerText.slice(0, 300)}];
        })))(%s)""" % json.dumps(selectors)
        return self.evaluate(script)


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """Debian's Chromium: installed with apt-get when missing (CI runs as root); a failure fails the tests."""
    if shutil.which("chromium") is None:
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=environment)
        install = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium", "fonts-dejavu-core"],
                                 capture_output=True, text=True, env=environment)
        if install.returncode != 0:
            pytest.fail(f"cannot install Debian's chromium (the browser tests need it; run as root, or "
                        f"`apt-get install chromium`):\n{update.stderr[-2000:]}\n{install.stdout[-2000:]}\n{install.stderr[-2000:]}")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not on PATH after installing it: install Debian's chromium package")
    version = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0 or "Chromium" not in version.stdout:
        pytest.fail(f"chromium does not run: exit {version.returncode}\n{version.stdout}\n{version.stderr}")
    return executable


@pytest.fixture(scope="module")
def browser(chromium_executable: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tmp_path_factory.mktemp("chromium-profile")
    instance = Chromium(chromium_executable, profile, ARTIFACTS / "chromium.log")
    try:
        instance.send("Browser.getVersion", timeout=60)  # fails here, with the log's path, if it cannot start
        yield instance
    finally:
        instance.close()


# -- a real lineage: generation 0, then two trained generations on two domains ---------------------------


def selftune(state: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([SELFTUNE, "--state", str(state), *args], capture_output=True, text=True,
                            env={**os.environ, **FAST, **(env or {})}, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def cycle(state: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return json.loads(selftune(state, "cycle", "--wait", "--json", *args, env=env).stdout)


@pytest.fixture(scope="module")
def real_state(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A real lineage on the tiny model, through the real CLI and worker:

    generation 1 (python_docs, branch main, promoted); branch ``chem`` forked from it for domain chemistry;
    generation 2 (half of chemistry_elements, chem, promoted: its forgetting matrix has python);
    generation 3 (the other half, chem, rejected by a parameter gate that demands pruning).
    """
    root = tmp_path_factory.mktemp("report-state")
    state = root / "state"
    selftune(state, "init", "--foundation", str(tiny_model_dir))
    selftune(state, "ingest", str(SAMPLES / "python_docs.jsonl"))
    assert cycle(state)["status"] == "promoted"
    selftune(state, "branch", "create", "chem", "--from", "1", "--domain", "chemistry")
    rows = (SAMPLES / "chemistry_elements.jsonl").read_text().splitlines()
    waves = ((rows[:60], {}, "promoted"), (rows[60:], {"SELFTUNE_GATES__MAX_PARAMS_RATIO": "0.5"}, "rejected"))
    for wave, (lines, env, expected) in enumerate(waves):
        path = root / f"chemistry-{wave}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        selftune(state, "ingest", str(path))
        result = cycle(state, "--branch", "chem", env=env)
        assert (result["status"], result["generation"]) == (expected, wave + 2), result
    return state


def generation_dir(state: Path, generation_id: int) -> Path:
    return state / "generations" / str(generation_id)


def manifest_of(state: Path, generation_id: int) -> dict[str, Any]:
    return json.loads((generation_dir(state, generation_id) / "generation.json").read_text())


def assert_clean(page: Page) -> None:
    assert page.problems() == [], page.problems()
    external = [u for u in page.requests() if not u.startswith(("file:", "data:"))]
    assert external == [], f"the page fetched something from outside itself: {external}"


def gate_rows(page: Page) -> list[list[str]]:
    """Each gate row as [class, name, verdict, its verdict cell's colour, its background colour]."""
    return page.evaluate("[...document.querySelectorAll('#gates tbody tr')].map(r => [r.className, "
                         "r.querySelector('code').textContent, r.cells[1].textContent, "
                         "getComputedStyle(r.cells[1]).color, getComputedStyle(r.cells[0]).backgroundColor])")


GREEN, GREEN_BACKGROUND = "rgb(26, 127, 55)", "rgb(218, 251, 225)"
RED, RED_BACKGROUND = "rgb(207, 34, 46)", "rgb(255, 235, 233)"


def assert_gates_in_colour(page: Page, gates: list[dict[str, Any]]) -> None:
    expected = [["pass", g["name"], "pass", GREEN, GREEN_BACKGROUND] if g["passed"] else
                ["fail", g["name"], "FAIL", RED, RED_BACKGROUND] for g in gates]
    assert gate_rows(page) == expected


# -- the tests ------------------------------------------------------------------------------------------


def test_a_real_generations_report_shows_its_gates_heat_map_and_curves(browser: Chromium, real_state: Path) -> None:
    page = Page(browser)
    page.open((generation_dir(real_state, 2) / "report.html").as_uri())
    page.screenshot(ARTIFACTS / "report-generation-2.png")
    layout = page.layout(["#gates table", "#forgetting-heatmap", "#training-curves", "#data-plot", "#samples .samples",
                          "#lineage .node.me", "#status", "#replay-mix"])
    for selector, box in layout.items():
        assert box["found"] and box["visible"], (selector, box)
    for image in ("#forgetting-heatmap", "#training-curves", "#data-plot"):
        assert layout[image]["image"]["complete"] and layout[image]["image"]["width"] > 300, (image, layout[image])
    manifest = manifest_of(real_state, 2)
    assert layout["#status"]["text"] == "promoted" == manifest["status"]
    assert_gates_in_colour(page, manifest["gates"])
    suites = page.evaluate("[...document.querySelectorAll('#forgetting tbody td:first-child')].map(c => c.textContent)")
    probe = ["foundation probe"] if manifest["metrics"]["candidate"]["foundation_probe_loss"] is not None else []
    assert suites == ["new data (this cycle, held out)", "experience: python", *probe]
    assert page.evaluate("document.querySelectorAll('#samples .samples').length") == 3
    assert_clean(page)


def test_a_real_rejected_generations_report_shows_the_failed_gate_in_red(browser: Chromium, real_state: Path) -> None:
    page = Page(browser)
    page.open((generation_dir(real_state, 3) / "report.html").as_uri())
    page.screenshot(ARTIFACTS / "report-generation-3-rejected.png")
    manifest = manifest_of(real_state, 3)
    assert page.layout(["#status"])["#status"]["text"] == "rejected" == manifest["status"]
    assert_gates_in_colour(page, manifest["gates"])
    failed = [row[1] for row in gate_rows(page) if row[0] == "fail"]
    assert failed == ["params_ratio"]
    suites = page.evaluate("[...document.querySelectorAll('#forgetting tbody td:first-child')].map(c => c.textContent)")
    assert {"experience: chemistry", "experience: python"} <= set(suites), suites
    assert_clean(page)


def test_user_text_is_shown_as_text_never_run_as_markup(browser: Chromium, real_state: Path, tmp_path: Path) -> None:
    """The real generation's manifest with hostile sample text, gate reason and alias, written again."""
    manifest = {k: v for k, v in manifest_of(real_state, 2).items() if k not in ("id", "files", "checksum")}
    manifest["gates"][0] = {**manifest["gates"][0], "reason": "<b>bold</b> <img src=x onerror=\"console.error('x')\">"}
    hostile = "<script>console.error('pwned')</script><img src=x onerror=\"console.error('xss')\">"
    suites = {"parent": {"samples": [{"prompt": hostile, "reference": "ref", "answer": "old"}]},
              "candidate": {"samples": [{"prompt": hostile, "reference": "ref", "answer": hostile}]}}
    lineage = [{**row, "aliases": [*row["aliases"], "<i>alias</i>"]} for row in lineage_rows(Context.open(str(real_state)))]
    write_reports(tmp_path, 2, manifest, suites, lineage)
    page = Page(browser)
    page.open((tmp_path / "report.html").as_uri())
    page.screenshot(ARTIFACTS / "report-escaping.png")
    assert page.evaluate("document.querySelectorAll('script, img:not(.plot), #gates b, #lineage i').length") == 0
    assert "<b>bold</b>" in page.evaluate("document.querySelector('#gates tbody tr').innerText")
    assert hostile in page.evaluate("document.querySelector('#samples .samples').innerText")
    assert "<i>alias</i>" in page.evaluate("document.querySelector('#lineage').innerText")
    assert_clean(page)


def test_the_lineage_page_shows_every_generation_with_status_aliases_and_report_links(
        browser: Chromium, real_state: Path, tmp_path: Path) -> None:
    rows = lineage_rows(Context.open(str(real_state)))
    generations = real_state / "generations"
    page_file = tmp_path / "lineage.html"
    page_file.write_text(render_lineage_html(rows, report_url=generations.as_uri() + "/{id}/report.html"))
    page = Page(browser)
    page.open(page_file.as_uri())
    page.screenshot(ARTIFACTS / "lineage.png")
    sections = page.evaluate("[...document.querySelectorAll('section.branch')].map(s => s.id)")
    assert sections == ["branch-main", "branch-chem"]
    nodes = page.evaluate("[...document.querySelectorAll('.node')].map(n => ({id: n.id, status: n.dataset.status, "
                          "visible: n.getBoundingClientRect().height > 0, text: n.innerText, "
                          "border: getComputedStyle(n).borderLeftColor, "
                          "link: n.querySelector('a.report') && n.querySelector('a.report').href}))")
    assert [(n["id"], n["status"]) for n in nodes] == [("generation-0", "promoted"), ("generation-1", "promoted"),
                                                       ("generation-2", "promoted"), ("generation-3", "rejected")]
    assert [n["border"] for n in nodes] == [GREEN, GREEN, GREEN, RED]
    by_id = {r["id"]: r for r in rows}
    assert by_id[1]["aliases"] == ["champion"] and by_id[2]["aliases"] == ["champion"] and by_id[3]["aliases"] == []
    for node in nodes:
        row = by_id[int(node["id"].split("-")[1])]
        assert node["visible"] and all(alias in node["text"] for alias in row["aliases"])
        if row["parent"] is None:
            assert node["link"] is None and "foundation" in node["text"]
        else:
            assert node["link"] == (generations / str(row["id"]) / "report.html").as_uri()
            assert "new-data loss" in node["text"], node
    parent_of_3 = page.evaluate("document.querySelector('#generation-3').closest('ul').closest('li').querySelector('.node').id")
    assert parent_of_3 == "generation-2"  # nested under its parent
    assert "Forked from generation 1 of branch main." in page.evaluate("document.querySelector('#branch-chem').innerText")
    page.open(nodes[-1]["link"])  # the link leads to that generation's report
    assert page.evaluate("document.querySelector('h1').textContent").startswith("Generation 3")
    assert_clean(page)


def test_the_generation_directory_holds_every_report_checksummed(real_state: Path) -> None:
    manifest = manifest_of(real_state, 2)
    for name in ("report.html", "report.md", "report.json", "README.md", "plots/curves.png", "plots/forgetting.png"):
        assert name in manifest["files"], name
    report = json.loads((generation_dir(real_state, 2) / "report.json").read_text())
    assert report["id"] == 2 and report["parent"] == 1 and report["branch"] == "chem"
    assert report["gates"] == manifest["gates"]
    assert len(report["training"]["curves"]["loss"]) == manifest["training"]["steps"]
    assert len(report["samples"]) == 3 and all(s["prompt"] and s["parent"] is not None and s["child"] is not None
                                                for s in report["samples"])
    assert (generation_dir(real_state, 2) / "README.md").read_text().startswith("---\nlibrary_name: transformers\n")
