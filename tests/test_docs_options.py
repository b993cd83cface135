"""docs/ list the options of every model family, reward and judge as ``vpotool.options_docs`` renders them from the
tables the command line checks against (MODEL_OPTIONS, REWARD_OPTIONS, JUDGE_OPTIONS), so they cannot drift."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vpotool.errors import VpoError
from vpotool.options_docs import DOC_BLOCKS, doc_block, write_docs

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("page", sorted(DOC_BLOCKS))
def test_the_docs_options_tables_are_the_ones_the_tables_render(page):
    source, render = DOC_BLOCKS[page]
    text = (DOCS / page).read_text(encoding="utf-8")
    start, end = doc_block(text, source)
    assert text[start:end] == render(), f"docs/{page}'s options table is stale: run python -m vpotool.options_docs"


def test_the_tables_name_every_family_reward_and_judge():
    from vpotool.models import MODELS
    from vpotool.rewards import JUDGE_OPTIONS, REWARD_OPTIONS, REWARDS

    models, rewards = DOC_BLOCKS["models.md"][1](), DOC_BLOCKS["rewards.md"][1]()
    assert all(f"| `{name}` |" in models for name in MODELS)
    assert all(f"| `{name}` |" in rewards for name in [*REWARDS, *JUDGE_OPTIONS])
    assert all(f"| `{option}` |" in rewards for table in REWARD_OPTIONS.values() for option in table)
    assert "| `dynamics` | `top_fraction` | float >= 0 | 0.05 |" in rewards and "| `flicker` | none |" in rewards


def test_write_docs_rewrites_a_stale_block_and_only_it(tmp_path):
    for page in DOC_BLOCKS:
        shutil.copy(DOCS / page, tmp_path / page)
    stale = (tmp_path / "rewards.md").read_text().replace("| `raft` | `iters` |", "| `raft` | `steps` |")
    (tmp_path / "rewards.md").write_text(stale)
    assert write_docs(tmp_path) == [tmp_path / "rewards.md"]
    assert (tmp_path / "rewards.md").read_text() == (DOCS / "rewards.md").read_text()
    assert write_docs(tmp_path) == []
    (tmp_path / "models.md").write_text("# Models\n")
    with pytest.raises(VpoError, match="no options block"):
        write_docs(tmp_path)
