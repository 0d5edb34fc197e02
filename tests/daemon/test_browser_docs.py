"""`/docs` renders in a real browser with the network off: Swagger UI's assets come from a Python package.

The app runs under a real uvicorn on 127.0.0.1; Chromium (Playwright, Debian's binary) resolves no host name
but 127.0.0.1, as on a machine without internet. The screenshot is saved under test-artifacts/browser/ and
its path printed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn

from selftune.daemon.context import Context
from selftune.daemon.http.app import create_app

from .conftest import BROWSER_ARTIFACTS, WatchedPage, free_port


@pytest.fixture
def served(make_state: Callable[..., Path]) -> Iterator[str]:
    """The API of a fresh state on a real socket (no champion preloaded: /docs needs none); its base URL."""
    context = Context.open(str(make_state()))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(context, preload=False), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        context.store.engine.dispose()


def test_docs_render_swagger_ui_offline(served: str, open_page: Callable[[str], WatchedPage]) -> None:
    watched = open_page(f"{served}/docs")
    page = watched.page
    page.wait_for_selector(".swagger-ui .opblock", timeout=10_000)  # Swagger UI ran and read /openapi.json
    shot = BROWSER_ARTIFACTS / "docs-offline.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot of /docs rendered offline: {shot}")
    assert page.inner_text(".swagger-ui .info .title").startswith("selftune")
    paths = page.eval_on_selector_all(".opblock-summary-path", "nodes => nodes.map(n => n.dataset.path)")
    assert {"/v1/interactions", "/v1/chat/completions", "/v1/cycles/{cycle_id}", "/metrics"} <= set(paths), paths
    assert watched.external_requests(served) == []
    assert watched.problems == []
