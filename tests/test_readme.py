"""The README's claims point at tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: ``tests/<file>.py::<test>`` as the README cites a proof; a name ending in
#: ``_`` followed by ``*`` stands for every test it starts.
CITED = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)(\*?)")


def test_every_test_the_readme_cites_exists() -> None:
    text = (ROOT / "README.md").read_text()
    cited = set(CITED.findall(text))
    assert len(cited) > 20, "the README cites its proofs by test name"
    missing = []
    for path, name, star in sorted(cited):
        source = ROOT / path
        pattern = rf"def {name}\w*\(" if star else rf"def {name}\("
        if not source.exists() or not re.search(pattern, source.read_text()):
            missing.append(f"{path}::{name}{star}")
    assert not missing, f"the README cites tests that do not exist: {missing}"


def test_every_setting_is_in_the_configuration_table() -> None:
    from fleetworks.settings import Settings

    text = (ROOT / "README.md").read_text()
    missing = [
        f"FLEET_{name.upper()}"
        for name in Settings.model_fields
        if f"`FLEET_{name.upper()}`" not in text
    ]
    assert not missing, f"settings the README does not describe: {missing}"


def test_every_command_is_in_the_commands_table() -> None:
    import click

    from fleetworks.cli import main

    text = (ROOT / "README.md").read_text()

    def leaves(group: click.Group, prefix: str) -> list[str]:
        found = []
        for name, command in group.commands.items():
            if command.hidden:
                continue
            found.append(f"{prefix} {name}")
            if isinstance(command, click.Group):
                found.extend(leaves(command, f"{prefix} {name}"))
        return found

    missing = [name for name in leaves(main, "fleetworks") if f"`{name}" not in text]
    assert not missing, f"commands the README does not list: {missing}"
