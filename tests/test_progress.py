"""Progress in logs: a bar on a terminal, plain lines (one per case) elsewhere, never carriage-return frames."""

import io
import subprocess
import sys
from pathlib import Path

from store.progress import LineProgress, progress_bar

ROOT = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_one_line_per_update_with_the_bars_figures():
    out = io.StringIO()
    bar = LineProgress(3, "build-store", "case", stream=out)
    bar.update()
    bar.set_postfix(done=1, failed=0)
    bar.update()
    bar.set_postfix(done=1, failed=1)
    bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert [x.split(" in ")[0] for x in lines] == ["build-store: 1/3 cases", "build-store: 2/3 cases",
                                                   "build-store: 3/3 cases"]
    assert lines[1].endswith("done=1, failed=1") and "case/s" in lines[0] and "\r" not in out.getvalue()


def test_the_bar_is_chosen_by_where_stderr_goes(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert isinstance(progress_bar(2, "x", "case"), tqdm)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(2, "x", "case"), LineProgress)
    quiet = progress_bar(2, "epoch 1/2", "step", lines=False)  # training prints its own line per epoch
    assert isinstance(quiet, tqdm) and quiet.disable
    assert progress_bar(2, "x", "case", enabled=False).disable


def test_a_command_writing_to_a_file_logs_lines_not_frames(tmp_path):
    log = tmp_path / "synth.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "prep", "synth", "--out", str(tmp_path / "raw"), "--cases", "3",
                            "--shape", "24", "24", "16", "--workers", "1"], cwd=ROOT, stdout=f, stderr=f)
    text = log.read_text()
    assert r.returncode == 0 and "\r" not in text
    assert [x.split(" in ")[0] for x in text.splitlines() if x.startswith("synth: ")] == [
        "synth: 1/3 cases", "synth: 2/3 cases", "synth: 3/3 cases"]
