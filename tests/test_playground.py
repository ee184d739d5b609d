"""The playground page in a real headless Chromium (Debian's package, driven by Playwright).

The browser loads the page from a real uvicorn on 127.0.0.1, lists the prompts, sends an
input to two prompts side by side, and must show each streamed output (arriving in several
pieces) and, for a refused request, the server's error message. A screenshot is kept in
build/test-artifacts/.
"""

from __future__ import annotations

import time
from pathlib import Path

from servers import BASE, SOURCES, expected_output, make_responsive, running, write_prompts

from softprompt.engine import Engine
from softprompt.serving.app import Server, ServerConfig

ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"



def test_playground_streams_two_prompts_side_by_side_and_shows_errors(tiny, tmp_path,
                                                                      browser):
    model, tok, _ = tiny
    make_responsive(model)
    prompts = write_prompts(tmp_path / "prompts", model.config.hidden_size)
    server = Server(Engine(model, tok), ServerConfig(tmp_path / "prompts", BASE,
                                                     max_new_tokens_limit=64))
    server.load_all()
    # A tiny model decodes 24 tokens in milliseconds, and on a loaded machine the browser may
    # then read the whole stream in one go; 20 ms per decoding step keeps the pieces apart.
    server.engine.on_step = lambda _: time.sleep(0.02)
    with running(server) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.set_default_timeout(20_000)
        page.goto(url + "/")
        panes = page.locator(".pane")
        page.wait_for_function("document.querySelectorAll('.pane select option').length > 4")
        assert panes.nth(0).locator("select").input_value() == "de3"
        assert panes.nth(1).locator("select").input_value() == "de5"
        page.fill("#field-source", SOURCES[0])
        page.fill("#maxtokens", "24")
        # Count how many times each output box changes: streamed text arrives in pieces.
        page.evaluate("""() => { window.pieces = [0, 0];
            document.querySelectorAll('.pane .output').forEach((el, i) =>
              new MutationObserver(() => window.pieces[i]++).observe(el,
                {childList: true, characterData: true, subtree: true})); }""")
        page.click("#send")
        page.wait_for_function("[...document.querySelectorAll('.pane .meta')]"
                               ".every(m => m.textContent.includes('ms'))")
        outputs = [panes.nth(i).locator(".output").inner_text() for i in range(2)]
        for name, shown in zip(("de3", "de5"), outputs):
            tensor, task = prompts[name]
            assert shown.strip() == expected_output(model, tok, tensor, task,
                                              {"source": SOURCES[0]}, 24)
        assert outputs[0] != outputs[1]
        assert min(page.evaluate("window.pieces")) > 2
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "playground.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        # A refused request: its error message is shown in the pane.
        page.fill("#maxtokens", "500")
        page.click("#send")
        page.wait_for_function("document.querySelector('.pane .meta').classList"
                               ".contains('error')")
        assert "over this server's limit 64" in panes.nth(0).locator(".meta").inner_text()
        page.screenshot(path=str(ARTIFACTS / "playground-error.png"), full_page=True)
