"""The generated config reference in docs/ matches the code."""

from pathlib import Path

from silotune.config import reference_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_reference_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/config.md is stale: run `silotune config --reference > docs/config.md`"
    )
