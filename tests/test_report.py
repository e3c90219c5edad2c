"""python -m evaluate report: one self-contained page per run, opened in headless Chromium."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.report_bench import CHROMIUM, FLAGS
from evaluate.cli import main as eval_main
from evaluate.html_report import GENERATOR
from store import open_store
from train.cli import main as train_main

from .helpers import fake_kfold


@pytest.fixture(scope="module")
def scored_run(tiny_store, tmp_path_factory):
    """A tiny trained run whose test split was scored (which writes the report)."""
    run = tmp_path_factory.mktemp("report") / "run"
    assert train_main(["--store", tiny_store, "--run-dir", str(run), "--channels", "4", "8", "16", "--patch-size",
                       "16", "16", "16", "--workers", "0", "--epochs", "2", "--val-every", "1", "--modalities",
                       "t1", "t2", "flair"]) == 0
    assert eval_main(["--run-dir", str(run), "--split", "train", "--metrics", "legacy"]) == 0  # 4 cases to sort
    assert eval_main(["--run-dir", str(run)]) == 0  # the test split (one case)
    return run


def _test_rows(run: Path, split: str = "test") -> list[dict]:
    with open(run / "eval" / f"{split}.csv") as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_a_self_contained_report(scored_run, tiny_store, capsys):
    page = (scored_run / "report.html").read_text()
    cases = open_store(tiny_store).splits["test"]
    assert cases and all(c in page for c in cases)
    assert f'content="{GENERATOR}"' in page
    assert "data:image/png;base64," in page  # curves and overlays embedded
    assert page.count('<figure id="case-test-') == len(cases)  # one overlay per test case
    # nothing fetched from elsewhere: no http(s) URL in any src or href, and the policy forbids any
    assert "src=\"http" not in page and "href=\"http" not in page and "default-src 'none'" in page
    for family in ("legacy", "brats2023", "brats2025"):
        assert f'id="table-test-{family}"' in page
    # the scores are the CSV's: every case's dice_wt, as the page shows it
    for row in _test_rows(scored_run):
        assert f"{float(row['dice_wt']):.3f}" in page
    assert "no evaluation yet" not in page


def test_overlays_worst_case_first(scored_run):
    page = (scored_run / "report.html").read_text()
    rows = _test_rows(scored_run, "train")
    assert len(rows) == 4
    mean = {r["case"]: np.nanmean([float(r[f"dice_{x}"]) for x in ("tc", "wt", "et")]) for r in rows}
    shown = [c for _, c in sorted((page.index(f'id="case-train-{c}"'), c) for c in mean)]
    assert shown == sorted(mean, key=lambda c: (mean[c], c))


def test_a_run_with_no_evaluation_says_what_is_missing(scored_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(scored_run, bare, ignore=shutil.ignore_patterns("eval", "report.html"))
    assert eval_main(["report", "--run-dir", str(bare)]) == 0
    page = (bare / "report.html").read_text()
    assert "no evaluation yet" in page and "training curves" in page
    assert sorted(p.name for p in bare.iterdir()) == sorted([*(p.name for p in scored_run.iterdir()
                                                               if p.name != "eval")])


def test_a_kfold_run_shows_every_fold(scored_run, tmp_path):
    kf = fake_kfold(scored_run, tmp_path / "kf", 3)
    for k in range(3):
        shutil.copy(scored_run / "metrics.jsonl", kf / f"fold-{k}" / "metrics.jsonl")
    assert eval_main(["report", "--run-dir", str(kf)]) == 0
    page = (kf / "report.html").read_text()
    assert all(f"<td>fold-{k}</td>" in page for k in range(3)) and "k-fold" in page


def test_bad_input_is_one_line_and_nothing_else_is_replaced(scored_run, tmp_path, capsys):
    assert eval_main(["report", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a run folder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "report.html").exists()
    run = tmp_path / "run"
    shutil.copytree(scored_run, run)
    theirs = "<html>someone's own notes</html>"
    (run / "report.html").write_text(theirs)
    assert eval_main(["report", "--run-dir", str(run)]) == 2
    assert "was not written by" in capsys.readouterr().err
    assert (run / "report.html").read_text() == theirs
    # a link named report.html: its target is never written through
    target = tmp_path / "elsewhere.html"
    target.write_text(theirs)
    (run / "report.html").unlink()
    (run / "report.html").symlink_to(target)
    assert eval_main(["report", "--run-dir", str(run)]) == 2
    assert target.read_text() == theirs
    # a rerun replaces its own page, and writes nothing else
    (run / "report.html").unlink()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert eval_main(["report", "--run-dir", str(run)]) == 0
    assert eval_main(["report", "--run-dir", str(run)]) == 0
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == sorted([*before, Path("report.html")])


def test_the_report_in_headless_chromium(scored_run, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    rows = _test_rows(scored_run, "train")
    url = (scored_run / "report.html").resolve().as_uri()
    requests, table = [], "#table-train-legacy"
    with sync_playwright() as p:
        # Debian's Chromium (make test installs it where missing), started as the report benchmark starts it
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.on("request", lambda r: requests.append(r.url))
            # the network is off: anything but the file itself is refused (and recorded above)
            page.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
            page.goto(url, wait_until="load")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            text = page.inner_text("body")
            heads = page.eval_on_selector_all(f"{table} thead th", "hs => hs.map(h => h.textContent)")
            col = heads.index("dice_wt")
            read = f"rows => rows.map(r => [r.cells[0].textContent, parseFloat(r.cells[{col}].dataset.value)])"
            page.locator(f"{table} thead th").nth(col).click()
            ascending = page.eval_on_selector_all(f"{table} tbody tr", read)
            page.locator(f"{table} thead th").nth(col).click()
            descending = page.eval_on_selector_all(f"{table} tbody tr", read)
        finally:
            browser.close()
    assert requests == [url]  # the page itself, nothing else
    assert all(r["case"] in text for r in [*rows, *_test_rows(scored_run)])
    truth = {r["case"]: float(r["dice_wt"]) for r in rows}
    for order, sign in ((ascending, 1), (descending, -1)):
        assert sorted(c for c, _ in order) == sorted(truth)
        assert all(v == truth[c] for c, v in order)
        values = [sign * v for _, v in order]
        assert values == sorted(values)
    img = np.asarray(Image.open(shot).convert("L"), float)
    assert img.shape[0] > 1600 and img.std() > 20 and len(np.unique(img)) > 50  # not blank: text, curves, MRI


def test_report_help_names_its_flag(capsys):
    with pytest.raises(SystemExit):
        eval_main(["report", "--help"])
    assert "--run-dir" in capsys.readouterr().out
