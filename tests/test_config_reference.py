"""docs/config.md is the schema's: every field with its type, default, bounds and what it is for, made from
dmdr_rl/config.py, so that a new or changed field cannot leave the page behind."""

import pytest

from dmdr_rl.config import RunConfig
from dmdr_rl.config_reference import REFERENCE_PATH, WRITE_COMMAND, field_notes, main, reference, section_rows


def _rows() -> dict:
    return {row.field: row for row in section_rows(RunConfig, "")}


def test_docs_config_md_is_the_schemas():
    assert REFERENCE_PATH.read_text() == reference(), f"docs/config.md is out of date: run `{WRITE_COMMAND}`"


def test_every_field_says_what_it_is_for_and_every_section_has_a_docstring():
    rows = list(section_rows(RunConfig, ""))
    assert len(rows) > 100
    assert [row.field for row in rows if not row.note and row.field.count(".") + row.field.count("[]") > 0] == []
    sections = {type(getattr(RunConfig(), name)) for name in RunConfig.model_fields if name not in ("name", "rewards")}
    assert [s.__name__ for s in sections if not s.__doc__ or s.__doc__.startswith(s.__name__ + "(")] == []


def test_rows_take_defaults_bounds_and_notes_from_the_schema():
    rows = _rows()
    # a nested section's defaults are its parent's (the two adapters' ranks differ)
    assert (rows["student.lora.rank"].default, rows["critic.lora.rank"].default) == ("`64`", "`32`")
    assert rows["student.steps"].type == "int (>= 1, <= 8)" and rows["student.sampler"].type == "`ode` or `sde`"
    assert rows["rewards[].name"].default == "required" and rows["rewards[].serve.replicas"].default == "`1`"
    assert rows["dmd.renoise_beta"].default == "`[4, 1.5]`" and rows["output.dir"].default == "`runs/{name}`"
    # the comment lines above a field and the one beside it, in order
    assert rows["dmd.cfg_max_tau"].note.startswith("the real score's CFG only where tau <= this")
    assert rows["critic.real_scale0"].note.endswith("0: the real score is the teacher from the first step (no DynaDG)")
    assert field_notes(RunConfig)["name"].startswith("the run's name")


def test_check_says_how_to_bring_the_page_up_to_date(tmp_path, monkeypatch):
    import dmdr_rl.config_reference as config_reference

    stale = tmp_path / "config.md"
    stale.write_text("# an old page\n")
    monkeypatch.setattr(config_reference, "REFERENCE_PATH", stale)
    with pytest.raises(SystemExit, match="python -m dmdr_rl.config_reference --write"):
        main(["--check"])
    main(["--write"])
    main(["--check"])  # (current now)
    assert stale.read_text() == reference()


def test_placeholders_in_words_are_shown_not_read_as_html():
    """GitHub drops what looks like an HTML tag: toy:<split> would read toy: in a table cell."""
    assert "toy:&lt;split&gt;" in reference() and "toy:<split>" not in reference().split("## data")[1]
