"""The README documents every configuration key and every command (drift check)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_type_hints

from otelflow.cli import build_parser
from otelflow.config import Config

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = get_type_hints(cls, include_extras=False)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            out.append(prefix + f.name)
    return out


def test_every_config_key_is_in_the_readme() -> None:
    missing = [k for k in _keys(Config) if f"| `{k}` |" not in README]
    assert not missing, f"README's configuration table lacks {missing}"


def test_every_command_is_in_the_readme() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [name for name in sub.choices if f"`otelflow {name}" not in README]  # type: ignore[union-attr]
    assert not missing, f"README's command table lacks {missing}"
