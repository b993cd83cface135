"""The command line: every subcommand listed, help without torch, one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

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


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("vpotool ")
