"""A small Dockerfile and .dockerignore reader for the infra tests (no Docker engine needed).

Enough of the syntax for this project's files: comments, line continuations, the shell and
JSON (exec) forms, and ``--flag`` options of COPY/ADD. Build arguments are not expanded.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    arguments: str  # the rest of the (joined) line
    line: int  # where it starts, 1-based


def parse(path: Path) -> list[Instruction]:
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(part for part in pending if part).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    if pending:
        raise ValueError(f"{path}: the last instruction ends with a line continuation")
    return instructions


def words(arguments: str) -> list[str]:
    """The arguments as a list: the JSON form as is, the shell form split like a shell would."""
    if arguments.startswith("["):
        return json.loads(arguments)
    return shlex.split(arguments)


def copy_sources(instruction: Instruction) -> tuple[list[str], str, dict[str, str]]:
    """``(sources, destination, flags)`` of a COPY or ADD."""
    parts = words(instruction.arguments)
    flags = {}
    while parts and parts[0].startswith("--"):
        name, _, value = parts.pop(0)[2:].partition("=")
        flags[name] = value
    return parts[:-1], parts[-1], flags


def image_reference(arguments: str) -> str:
    """The image of a FROM (``--platform`` and ``AS name`` dropped)."""
    parts = [p for p in arguments.split() if not p.startswith("--")]
    return parts[0]


# .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def read_dockerignore(path: Path) -> list[tuple[bool, re.Pattern]]:
    """``[(is_exception, regex)]`` in file order (a later match wins, as in Docker)."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line[1:].strip() if exception else line
        rules.append((exception, _pattern_regex(pattern.strip("/"))))
    return rules


def excluded(relative_path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether Docker leaves ``relative_path`` out of the build context.

    A pattern applies to a path when it matches the path or one of its parent folders.
    """
    parts = relative_path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for exception, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            result = not exception
    return result
