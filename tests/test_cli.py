"""The command line: every subcommand listed, help without torch, one-line errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SUBCOMMANDS = [
    "sample", "score", "pair", "merge", "train-dpo", "train-refl", "train-scst", "eval", "loop", "report", "label",
]  # fmt: skip


def test_help_lists_every_subcommand(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for name in SUBCOMMANDS:
        assert name in out


def test_help_does_not_import_torch():
    code = (
        "import sys; sys.argv = ['vpotool', '--help']\n"
        "from vpotool.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'vpotool --help imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_unknown_option_is_one_line(cli):
    code, _, err = cli("sample", "--bogus")
    assert code == 2
    assert "No such option: --bogus" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, words",
    [
        (["sample", "--bogus"], ["vpotool sample: No such option: --bogus", "see vpotool sample --help"]),
        (["sample", "-k", "many"], ["vpotool sample: Invalid value for '--candidates'", "vpotool sample --help"]),
        (["merge", "--out", "x.parquet"], ["vpotool merge: Missing argument", "see vpotool merge --help"]),
        (["bogus"], ["vpotool: No such command 'bogus'", "see vpotool --help"]),
    ],
)
def test_usage_errors_are_one_line_naming_the_command_and_its_help(cli, args, words):
    code, out, err = cli(*args)
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    code, out, _ = cli(*[a for a in args[:1] if a in SUBCOMMANDS], "--help")  # help still answers
    assert code == 0 and "Usage: vpotool" in out


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("vpotool ")


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_worker_of_multi_process_run_skips_teardown(world_size):
    """As one of several torchrun workers the entry point exits without the interpreter's teardown (where native
    thread pools can abort a finished run), with its output flushed and its exit status kept; alone, it exits
    normally."""
    code = (
        "import atexit, sys; atexit.register(lambda: print('teardown'))\n"
        "from vpotool.cli import main\n"
        "sys.argv = ['vpotool', *sys.argv[1:]]; main()\n"
    )
    env = {**os.environ, "WORLD_SIZE": world_size, "TORCHELASTIC_RUN_ID": "test"}  # as torchrun sets them
    ok = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("vpotool ")
    assert ("teardown" in ok.stdout) == (world_size == "1")
    bad = subprocess.run([sys.executable, "-c", code, "sample", "--bogus"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "No such option: --bogus" in bad.stderr
