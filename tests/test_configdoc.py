"""Every settings field says what it does, and docs/config.md is what the generator writes now."""

import dataclasses

from fedleak.eval.configdoc import DOC, render, settings_tables


def test_every_settings_field_has_a_help_note():
    missing = [f"{table}: {f.name}" for table, cls in settings_tables() for f in dataclasses.fields(cls)
               if f.init and not f.metadata.get("help", "").strip()]
    assert not missing, f"fields without field(metadata={{'help': ...}}): {missing}"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/config.md is stale: run `python -m fedleak.eval.configdoc` and commit the result")
