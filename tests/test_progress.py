"""The shared progress helper: progress=True/False/None, plain time-stamped lines in logs, tqdm on a terminal, and
the loops that use it (SmoothGrad, occlusion, the optimization loop) report through it."""

from __future__ import annotations

import contextlib
import io
import re
import time

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.core import progress as P
from convscope.core.device import first_use
from convscope.core.progress import LogLines, is_terminal, progress_bar

LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(progress, n: int = 5, sleep: float = 0.0, **kw) -> str:
    log = io.StringIO()
    with progress_bar(total=n, desc="work", unit="img", progress=progress, file=log, **kw) as bar:
        for _ in range(n):
            time.sleep(sleep)
            bar.update(1)
    return log.getvalue()


def test_log_gets_whole_time_stamped_lines_with_an_eta():
    text = _run(True)
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert all(LINE.match(line) for line in lines)
    assert "work:   0% 0/5 img" in lines[0] and "<?" in lines[0]  # ETA field present from the start
    assert "work: 100% 5/5 img" in lines[-1]
    assert len(lines) == 2  # start and end only: the default interval keeps a log quiet


def test_log_prints_every_interval(monkeypatch):
    monkeypatch.setattr(P, "LOG_INTERVAL_S", 0.02)
    lines = _run(True, n=6, sleep=0.03).splitlines()
    assert len(lines) >= 5 and [int(re.search(r"(\d)/6", ln).group(1)) for ln in lines] == sorted(
        int(re.search(r"(\d)/6", ln).group(1)) for ln in lines)


def test_false_is_silent_and_auto_waits_for_long_work(monkeypatch):
    assert _run(False) == ""
    assert _run(None) == ""  # quick work: nothing
    monkeypatch.setattr(P, "AUTO_DELAY_S", 0.02)
    monkeypatch.setattr(P, "LOG_INTERVAL_S", 0.0)
    text = _run(None, n=4, sleep=0.03)
    assert "work: 100% 4/4" in text and "0/4" not in text  # appears once it has run AUTO_DELAY_S


def test_unknown_total_and_stderr_default(capsys):
    for _ in progress_bar(iter(range(3)), desc="open", progress=True):
        pass
    err = capsys.readouterr().err
    assert "open: 3 it [" in err and "%" not in err and "\r" not in err


def test_terminal_gets_a_tqdm_bar():
    term = FakeTerminal()
    assert is_terminal(term) and not is_terminal(io.StringIO())
    with progress_bar(total=3, desc="bar", progress=True, file=term) as bar:
        bar.update(3)
    assert "\r" in term.getvalue() and "3/3" in term.getvalue() and not LINE.match(term.getvalue())


def test_log_lines_drop_redraw_noise():
    log = io.StringIO()
    w = LogLines(log)
    w.write("\r   \x1b[A\n")
    w.write("\rstage: 1/2 [00:01<00:01]")
    w.write("\rstage: 1/2 [00:01<00:01]   ")  # the closing redraw of the same line
    w.write("\n\rother: 2/2 [00:02<00:00]\n")
    lines = log.getvalue().splitlines()
    assert [ln.split("] ", 1)[1] for ln in lines] == ["stage: 1/2 [00:01<00:01]", "other: 2/2 [00:02<00:00]"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("name", ["smoothgrad", "occlusion", "optimize"])
def test_methods_report_progress_and_results_do_not_depend_on_it(name, capsys):
    model = Tiny().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def call(progress):
        if name == "smoothgrad":
            return cs.smoothgrad(model, x, target=1, n=3, batch_size=2, progress=progress)
        if name == "occlusion":
            return cs.occlusion(model, x, target=1, window=4, stride=2, batch_size=5, progress=progress).maps
        # activation maximization runs through the shared loop, core.optim.optimize_images
        return cs.activation_maximization(model, "conv", [0, 1], steps=4, size=16, progress=progress).images

    first_use()  # the allocator's one-time hint (when glibc's defaults are in place) is not progress output
    capsys.readouterr()
    quiet = call(False)
    assert capsys.readouterr().err == ""
    shown = call(True)
    err = capsys.readouterr().err
    desc = {"optimize": "maximize"}.get(name, name)
    assert f"{desc}: 100%" in err and "\r" not in err
    torch.testing.assert_close(quiet, shown)


def _log_of(fn):
    """Run ``fn`` with stderr redirected to a plain (non-TTY) stream: ``(result, what it wrote)``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out = fn()
    return out, err.getvalue()


def test_top_k_pass_reports_in_log_lines():
    model = Tiny().eval()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    quiet, text = _log_of(lambda: cs.top_k_activations(model, x, "conv", k=2, batch_size=2, progress=False))
    assert text == ""
    shown, text = _log_of(lambda: cs.top_k_activations(model, x, "conv", k=2, batch_size=2, progress=True))
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text and all(LINE.match(ln) for ln in lines)
    assert "top-k:   0% 0/3 batch" in lines[0] and "top-k: 100% 3/3 batch" in lines[-1]
    torch.testing.assert_close(shown["conv"].values, quiet["conv"].values)
    assert torch.equal(shown["conv"].image_ids, quiet["conv"].image_ids)


def test_synthetic_generate_reports_in_log_lines(tmp_path):
    from convscope.data.synthetic import generate

    _, text = _log_of(lambda: generate(tmp_path / "d", n=3, size=32, seed=0, progress=True))
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text and all(LINE.match(ln) for ln in lines)
    assert "synth:   0% 0/3 img" in lines[0] and "synth: 100% 3/3 img" in lines[-1]
    assert (tmp_path / "d" / "index.csv").is_file()
    _, text = _log_of(lambda: generate(tmp_path / "e", n=2, size=32, seed=0, progress=False))
    assert text == ""


def test_stacked_bars_log_their_own_lines_and_stack_on_a_terminal():
    """The atlas builder's stage bars (``position=``): separate lines in a log, stacked rows on a terminal."""
    log, term = io.StringIO(), FakeTerminal()
    for target in (log, term):
        bars = [progress_bar(total=2, desc=f"stage{i}", unit="unit", position=i, progress=True, file=target)
                for i in range(3)]
        for b in bars:
            b.update(2)
        for b in bars:
            b.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert [ln.split("] ", 1)[1].split(":")[0] for ln in text.splitlines()] == ["stage0", "stage1", "stage2"] * 2
    assert "\x1b[A" in term.getvalue() and all(f"stage{i}: 100%" in term.getvalue() for i in range(3))


def test_postfix_does_not_add_log_lines(monkeypatch):
    """Loops that show a loss (upconv, train-demo) set it without a redraw, so a log keeps one line per interval."""
    from convscope.methods.upconv import train_upconv

    monkeypatch.setattr(LogLines, "repeat_s", 0.0)  # a redraw would show as a line even in a fast loop
    model = Tiny().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    dec, text = _log_of(lambda: train_upconv(model, "conv", x, epochs=5, batch_size=2, width=4,
                                                  augment=False, progress=True))
    lines = text.splitlines()
    assert len(lines) == 2 and "\r" not in text, text  # start and end only
    assert "upconv conv: 100% 5/5 epoch" in lines[-1] and f"loss={dec.losses[-1]:.4g}" in lines[-1]
