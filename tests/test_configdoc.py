"""Every settings field says what it does, and docs/config.md is what the generator writes now."""

import dataclasses

from fedleak.eval.configdoc import (DOC, builtin_components, docstring_sections, keyword_parameters, render,
                                    settings_tables)


def test_every_settings_field_has_a_help_note():
    missing = [f"{table}: {f.name}" for table, cls in settings_tables() for f in dataclasses.fields(cls)
               if f.init and not f.metadata.get("help", "").strip()]
    assert not missing, f"fields without field(metadata={{'help': ...}}): {missing}"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/config.md is stale: run `python -m fedleak.eval.configdoc` and commit the result")


def test_every_component_parameter_has_an_args_entry():
    """Each keyword argument of a built-in component is documented in its `__init__`'s `Args:`
    section (the config reference shows it), and no entry names a parameter that does not exist."""
    problems = []
    for _, name, cls in builtin_components():
        params = {p.name for p in keyword_parameters(cls)}
        documented = docstring_sections(cls.__init__).get("Args", {})
        problems += [f"{name}: {p} has no Args entry" for p in sorted(params - documented.keys())]
        problems += [f"{name}: {p} has an empty Args entry" for p in sorted(params & documented.keys())
                     if not documented[p]]
        problems += [f"{name}: Args entry {p} names no parameter" for p in sorted(documented.keys() - params)]
    assert not problems, "component __init__ docstrings: " + "; ".join(problems)


def test_docstring_sections_reads_google_style_entries():
    def init(self, *, a: int = 1, b: str = ""):
        """Summary line.

        Args:
            a: first line
                continued here.
            b: one line.

        Raises:
            ValueError: when a and b disagree.
        """

    assert docstring_sections(init) == {"Args": {"a": "first line continued here.", "b": "one line."},
                                        "Raises": {"ValueError": "when a and b disagree."}}
