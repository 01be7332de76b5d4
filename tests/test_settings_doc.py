"""``docs/settings.md`` is generated from ``app.settings.Settings``: every setting has a
description, and the file in the repository is what the generator writes today."""

from __future__ import annotations

import pytest
from pydantic import Field

from app import settings_doc
from app.settings import Settings


class WithAMadeUpSetting(Settings):
    made_up_ms: int = Field(default=5, gt=0)


def test_every_setting_has_a_description() -> None:
    assert settings_doc.undocumented() == []


def test_docs_settings_md_is_up_to_date() -> None:
    """Run ``python -m app.settings_doc`` after changing a setting."""
    assert settings_doc.DOC.read_text(encoding="utf-8") == settings_doc.render()
    assert settings_doc.main(["--check"]) == 0


def test_a_setting_without_a_description_fails_the_check() -> None:
    assert settings_doc.undocumented(WithAMadeUpSetting) == ["made_up_ms"]
    with pytest.raises(settings_doc.Undocumented, match="made_up_ms"):
        settings_doc.render(WithAMadeUpSetting)


def test_a_described_setting_missing_from_the_file_fails_the_check() -> None:
    class Described(Settings):
        made_up_ms: int = Field(default=5, gt=0, description="A setting made up here.")

    text = settings_doc.render(Described)
    row = next(line for line in text.splitlines() if "`made_up_ms`" in line)
    assert row == ("| `made_up_ms` | `AUTONOMY_MADE_UP_MS` | `5` | milliseconds | "
                   "A setting made up here. |")
    assert settings_doc.DOC.read_text(encoding="utf-8") != text


def test_each_row_names_the_variable_default_and_unit() -> None:
    text = settings_doc.render()
    assert ("| `database_url` | `AUTONOMY_DATABASE_URL`, `DATABASE_URL` | "
            "`sqlite:///autonomy.db` |") in text
    assert "| `lease_ttl_s` | `AUTONOMY_LEASE_TTL_S` | `300` | seconds | " in text
    assert "| `api_token` | `AUTONOMY_API_TOKEN` | `unset` |" in text
    assert text.count("\n| `") == len(Settings.model_fields)
