"""Every setting has one name and one default, wherever a user meets it: the config dataclasses
(the one definition), the configuration tables of docs/design.md, the flags of the commands
that override a setting, and the Python API.

The config dataclasses are walked, not listed here, so a setting added without its row in the
contract, or a default changed in one place only, fails.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import attribute
from pipeline.cli import _parser
from pipeline.config import AuditConfig, AuditSettings
from pipeline.config.typed import to_plain
from pipeline.kernel.options import ComputeOptions

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def _section_types() -> dict[str, type]:
    hints = inspect.get_annotations(AuditConfig, eval_str=True)
    return {k: v for k, v in hints.items() if dataclasses.is_dataclass(v)}


def _doc_rows() -> dict[str, str]:
    """``dotted key -> Default cell`` of the configuration tables of docs/design.md."""
    tops = set(_section_types())
    rows: dict[str, str] = {}
    section = None
    for line in DESIGN.read_text(encoding="utf-8").splitlines():
        heads = re.findall(r"\*\*`([a-z_.]+)`\*\*", line)
        if heads and line.startswith("**"):
            section = heads[-1]  # "**`trend`** and **`notify`**": rows name their own keys
            continue
        if line.startswith("## "):
            section = None
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if section is None or not line.startswith("| `") or len(cells) < 4:
            continue
        key = re.fullmatch(r"`([a-z_.]+)`", cells[0])
        if key:
            name = key.group(1)
            absolute = "." in name and name.split(".")[0] in tops  # "trend.runs_dir"
            rows[name if absolute else f"{section}.{name}"] = cells[2]
    return rows


def _plain(value: Any) -> Any:
    value = to_plain(value)
    if isinstance(value, enum.Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return _plain(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return _plain(f.default_factory())  # type: ignore[misc]
    return dataclasses.MISSING


def _settings(cls: type, prefix: str) -> dict[str, dataclasses.Field]:
    """``dotted key -> field`` of a section; a nested section that is always there (``columns``,
    ``coco``) contributes its own keys, an optional one (``normalize``, ``hub``) is one key."""
    out = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        nested = f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
            f.default_factory()  # type: ignore[misc]
        )
        if nested:
            out.update(_settings(type(f.default_factory()), key))  # type: ignore[misc]
        else:
            out[key] = f
    return out


ALL = {k: f for s, c in _section_types().items() for k, f in _settings(c, s).items()}


@pytest.mark.parametrize("section", sorted(_section_types()))
def test_every_setting_has_its_row_and_its_default_in_the_contract(section: str) -> None:
    rows = _doc_rows()
    mine = {k: f for k, f in ALL.items() if k.startswith(section + ".")}
    missing = [k for k in mine if k not in rows]
    assert not missing, f"docs/design.md lacks rows for {missing}"
    for key, f in mine.items():
        literal = re.fullmatch(r"`([^`]*)`(?: \(.*\))?", rows[key])
        if literal is None:
            continue  # a default in words ("required", "the manifest's folder")
        want = _default(f)
        got = yaml.safe_load(literal.group(1))
        if isinstance(want, float) and isinstance(got, int):
            got = float(got)
        assert got == want, f"{key}: docs say {rows[key]}, the code {want!r}"


def test_the_contract_documents_no_setting_the_code_lacks() -> None:
    # a nested section's own row ("columns: see below") is a pointer to its table
    extra = sorted(
        k for k in _doc_rows() if k not in ALL and not any(a.startswith(k + ".") for a in ALL)
    )
    assert not extra, f"docs/design.md documents settings the config does not have: {extra}"


def test_aggregate_flags_are_the_audit_settings_under_their_names() -> None:
    sub = next(a for a in _parser()._actions if a.dest == "command")
    aggregate = sub.choices["aggregate"]  # type: ignore[attr-defined]
    settings = {f.name for f in dataclasses.fields(AuditSettings)}
    flags = [a for a in aggregate._actions if a.option_strings and a.dest not in ("help",)]
    for action in flags:
        long = max(action.option_strings, key=len)
        if long == "--group-by":
            continue  # dataset.group_by
        assert long[2:].replace("-", "_") in settings, f"{long} names no audit setting"
        assert action.default is None, f"{long} restates a default; the setting has it"


def test_the_api_and_the_occlusion_section_share_names_and_defaults() -> None:
    from pipeline.config import OcclusionConfig

    params = inspect.signature(attribute).parameters
    options = {f.name: f for f in dataclasses.fields(ComputeOptions)}
    for f in dataclasses.fields(OcclusionConfig):
        if f.name in params:
            assert _plain(params[f.name].default) == _default(f), f.name
        else:
            assert f.name in options, f"occlusion.{f.name} is neither a keyword nor an option"
            assert _default(options[f.name]) == _default(f), f.name


def test_bench_flags_of_occlusion_settings_use_their_names_and_defaults() -> None:
    from pipeline.config import OcclusionConfig
    from pipeline.kernel import defaults

    sub = next(a for a in _parser()._actions if a.dest == "command")
    bench = sub.choices["bench"]  # type: ignore[attr-defined]
    fields = {f.name: f for f in dataclasses.fields(OcclusionConfig)}
    by_dest = {a.dest: a for a in bench._actions if a.option_strings}
    named = [d for d in by_dest if d in fields]
    # the flags a user expects to be occlusion settings are, under the setting's name
    want = {"n_baselines", "approx_threshold", "approx_check_windows", "max_batch", "mode"}
    assert want <= set(named), sorted(named)
    for dest in named:
        action, f = by_dest[dest], fields[dest]
        assert "--" + dest.replace("_", "-") in action.option_strings, action.option_strings
        extra = [o for o in action.option_strings if o != "--" + dest.replace("_", "-")]
        assert all(f"alias {o}" in (action.help or "") for o in extra), (dest, action.help)
        if dest == "n_baselines":  # None in the config: the baseline's; the bench draws pixels
            assert action.default == defaults.default_draws("random-pixel")
        elif dest in ("engine", "precision"):  # the bench's choice of rows, not the setting
            continue
        elif dest in ("window", "stride"):  # square sides; the stride's default: half the window
            window = _default(fields["window"])
            want_side = window if dest == "window" else list(defaults.default_stride(window))
            assert [action.default] * 2 == want_side, dest
        else:
            assert _plain(action.default) == _default(f), (dest, action.default)
