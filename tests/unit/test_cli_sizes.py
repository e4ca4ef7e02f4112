"""`submit --memory`: sizes as people write them, refused when they are not sizes."""

from __future__ import annotations

import click
import pytest

from orchestrator.cli import _mebibytes


@pytest.mark.parametrize(
    ("text", "mib"), [("512", 512), ("512m", 512), ("4g", 4096), ("1.5G", 1536), (None, None)]
)
def test_sizes(text: str | None, mib: int | None) -> None:
    assert _mebibytes(text) == mib


@pytest.mark.parametrize("text", ["", "0", "-1", "4x", "nan", "inf", "0.5", "1.0001g"])
def test_not_sizes(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a size"):
        _mebibytes(text)
