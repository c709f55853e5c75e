"""The README is a test: every ``convscope ...`` line in its shell blocks runs as written (at tiny sizes, through
``CONVSCOPE_SMOKE=1``), in document order, from one folder; its Python block runs too."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convscope.cli import SMOKE_ENV, main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[str]:
    """Every ``convscope`` command line of the README's bash blocks, comments stripped."""
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            cmd = line.split("  #")[0].split(" # ")[0].strip()
            if cmd.startswith("convscope "):
                lines.append(cmd)
    return lines


def test_readme_lists_the_commands():
    cmds = readme_commands()
    assert len(cmds) >= 20
    # every command of the CLI appears at least once in the README
    from convscope.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse keeps its subparsers here
    used = {shlex.split(c)[1] for c in cmds}
    missing = set(sub.choices) - used
    assert not missing, f"commands without a README line: {sorted(missing)}"


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(SMOKE_ENV, "1")
    threads = torch.get_num_threads()
    failed = []
    try:
        for cmd in readme_commands():
            code = main(shlex.split(cmd)[1:])
            err = capsys.readouterr().err.strip().splitlines()
            if code != 0:
                failed.append(f"{cmd}  ->  exit {code}: {err[-1] if err else ''}")
    finally:
        torch.set_num_threads(threads)  # `serve` sets the thread count
    assert not failed, "README lines that no longer run:\n" + "\n".join(failed)


def test_readme_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (code,) = [b for b in _blocks("python") if "import convscope" in b][:1]
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "cam.png").is_file()


def test_entry_points_start_fast_and_say_their_version():
    out = subprocess.run([sys.executable, "-m", "convscope", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("convscope ")
    # --help must not import torch (the parser is built from strings; methods load on use)
    probe = ("import sys; from convscope.cli import build_parser; build_parser().format_help(); "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"
