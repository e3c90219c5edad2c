"""``python -m benchmarks report --run-dir RUN``: the run's HTML report (``python -m evaluate report``) timed as
it is rendered and as headless Chromium opens it with the network refused; its size; a screenshot (the picture in
docs/evaluation.md). Goals: opened in under 2 s, at most 5 MB."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from .report import summarize, write_result

CHROMIUM = "/usr/bin/chromium"  # Debian's package (make test installs it)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def open_times(url: str, repeats: int, screenshot: Path | None = None) -> dict:
    """Seconds from navigation to the load event (the page's own Navigation Timing), each in a fresh page of one
    browser, every request but the page itself refused; and the requests it tried."""
    from playwright.sync_api import sync_playwright

    times, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            for i in range(repeats):
                page = browser.new_page(viewport={"width": 1280, "height": 1400})
                page.on("request", lambda r: requests.append(r.url))
                page.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
                page.goto(url, wait_until="load")
                times.append(page.evaluate("() => { const t = performance.getEntriesByType('navigation')[0];"
                                           " return (t.loadEventEnd - t.startTime) / 1000; }"))
                if screenshot is not None and i == 0:
                    page.screenshot(path=str(screenshot))
                page.close()
        finally:
            browser.close()
    return {"seconds": times, "requests_other_than_the_page": sorted({u for u in requests if u != url})}


def run(out: str | Path, run_dir: str | Path, repeats: int = 5) -> Path:
    from evaluate.html_report import write_report

    renders = []
    for _ in range(3):
        t0 = time.perf_counter()
        page = write_report(run_dir)
        renders.append(time.perf_counter() - t0)
    opened = open_times(page.resolve().as_uri(), repeats, Path(out) / "report.png")
    size = page.stat().st_size
    load = summarize(opened["seconds"])
    payload = {"command": f"python -m benchmarks report --run-dir {run_dir}", "run": str(run_dir),
               "bytes": size, "render_s": summarize(renders), "chromium_load_s": load,
               "chromium": _version(), "requests_other_than_the_page": opened["requests_other_than_the_page"],
               "goals": {"load_under_2_s": load["median"] < 2.0, "at_most_5_MB": size <= 5 * 2**20}}
    print(f"report {page}: {size / 2**20:.2f} MiB, rendered in {statistics.median(renders):.2f} s, opened in "
          f"Chromium in {load['median']:.3f} s (median of {repeats})")
    return write_result(out, "report", payload)


def _version() -> str:
    import subprocess

    try:
        return subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
