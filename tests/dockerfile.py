"""Just enough of a Dockerfile parser for the image tests: stages, instructions, ENV, exec forms."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Stage", "parse_dockerfile"]


@dataclass
class Stage:
    """One FROM ... stage: its name and its instructions in order."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """The arguments of every ``keyword`` instruction of the stage."""
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        """The arguments of the stage's last ``keyword`` instruction (the one that counts)."""
        found = self.all(keyword)
        assert found, f"the stage has no {keyword}"
        return found[-1]

    def env(self, base_path: str) -> dict[str, str]:
        """The environment ENV sets, ``$PATH`` expanded against ``base_path``."""
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV {token!r}: only the KEY=value form is used here"
                env[key] = _expand(value, {"PATH": base_path, **env})
        return env

    def exec_form(self, keyword: str) -> list[str]:
        """ENTRYPOINT / CMD / HEALTHCHECK CMD as an argv (the JSON exec form only)."""
        args = self.last(keyword)
        if keyword == "HEALTHCHECK":
            args = args[args.index("CMD ") + 4 :]
        argv = json.loads(args)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
        return argv


def _expand(value: str, known: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: known.get(m.group(1), ""), value)


def parse_dockerfile(path: Path) -> list[Stage]:
    """The stages of the Dockerfile at ``path``, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    args: dict[str, str] = {}
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = _expand(words[0], args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages

