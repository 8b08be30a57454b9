"""Shell scripts read, never run: the commands of a launch script such as MiniCPM-o's finetune_ds.sh.

Part of the readers (`planner.readers`, the edge of the flow beside the writers). It follows the
parts of bash that launch scripts use: ``VAR=value`` and ``export VAR=value``; ``$VAR``,
``${VAR}``, ``${VAR:-default}`` expanded outside single quotes, word-split when unquoted;
backslash-newline continuations; quotes spanning lines; ``#`` comments. Words are then split by
`shlex` (POSIX rules). Nothing is executed: a command substitution ``$(...)`` stays as written and
is reported, except the idiom scripts use for their own folder (``$(cd "$(dirname
"${BASH_SOURCE[0]}")" && pwd)``, ``$(dirname "$0")``), which becomes the script's folder.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGN_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
_SCRIPT_DIR_RE = re.compile(r"dirname\s+\"?\$(\{BASH_SOURCE(\[0\])?\}|BASH_SOURCE|0|\{0\})\"?")
_WORD_BREAK = " \t\n;|&()"
_NO_ARGS = "\x00"
"""What ``"$@"`` expands to: the script's own arguments, none when it is read; such a word is dropped."""


class ShellError(ValueError):
    """The script cannot be split into words (an unclosed quote at its end)."""


@dataclass(frozen=True)
class Command:
    """One simple command: its words after expansion, the ``VAR=value`` words before it, and the
    line it starts on (1-based)."""

    words: tuple[str, ...]
    env: dict[str, str]
    line: int


@dataclass
class ShellScript:
    """The commands of a script, its variables at the end, and what could not be followed."""

    commands: list[Command]
    variables: dict[str, str]
    notes: list[str] = field(default_factory=list)


def _quote_state(text: str) -> str | None:
    """The quote still open at the end of ``text`` (``'`` or ``"``), or None."""
    q: str | None = None
    i = 0
    while i < len(text):
        c = text[i]
        if q == "'":
            q = None if c == "'" else q
        elif c == "\\":
            i += 1
        elif q is None and c == "#" and (i == 0 or text[i - 1] in _WORD_BREAK):
            nl = text.find("\n", i)
            if nl < 0:
                return None
            i = nl
        elif c in "'\"":
            q = None if q == c else (c if q is None else q)
        i += 1
    return q


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each logical line: continuations joined, quotes closed.

    Raises:
        ShellError: a quote is still open at the end of the script.
    """
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = n
        stripped = line.rstrip("\r")
        trailing = len(stripped) - len(stripped.rstrip("\\"))
        if trailing % 2 == 1 and _quote_state(buf + stripped) != "'":
            buf += stripped[:-1]  # backslash-newline: removed, the line goes on
            continue
        buf += stripped
        if _quote_state(buf) is not None:
            buf += "\n"
            continue
        out.append((start, buf))
        buf = ""
    if buf:
        if _quote_state(buf) is not None:
            raise ShellError(f"line {start}: a quote opened here is never closed")
        out.append((start, buf))
    return out


def _escape(value: str, quoted: bool) -> str:
    """A value inserted into the line so that shlex reads it back literally (split on whitespace
    only when not ``quoted``)."""
    if quoted:
        return value.replace("\\", "\\\\").replace('"', '\\"')
    return re.sub(r"([\\'\"])", r"\\\1", value)


def _matching(text: str, i: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at ``i``, or -1."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j
    return -1


class _Expander:
    def __init__(self, variables: dict[str, str], folder: str | None, notes: list[str]) -> None:
        self.vars = variables
        self.folder = folder
        self.notes = notes

    def _lookup(self, name: str, line: int) -> str:
        if name in self.vars:
            return self.vars[name]
        if name in ("@", "*"):
            return _NO_ARGS
        if name not in ("@", "*") and not name.isdigit():
            self.notes.append(f"line {line}: ${name} is not set in the script; taken as empty")
        return ""

    def _braced(self, body: str, line: int) -> str | None:
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*|[@*0-9])(?:(:?[-=])(.*))?", body, re.S)
        if m is None:
            return None
        name, op, default = m.groups()
        value = self.vars.get(name)
        if op is None:
            return self._lookup(name, line)
        unset = value is None or (op.startswith(":") and value == "")
        if not unset:
            return value
        default = self.expand(default or "", line, quoted_context=True)
        if op.endswith("="):
            self.vars[name] = default
        return default

    def expand(self, text: str, line: int, quoted_context: bool = False) -> str:
        """``text`` with variables expanded and comments removed, ready for shlex."""
        out: list[str] = []
        q: str | None = '"' if quoted_context else None
        i = 0
        while i < len(text):
            c = text[i]
            if q == "'":
                out.append(c)
                q = None if c == "'" else q
                i += 1
                continue
            if c == "\\":
                out.append(text[i:i + 2])
                i += 2
                continue
            if not quoted_context and q is None and c == "#" and (i == 0 or text[i - 1] in _WORD_BREAK):
                nl = text.find("\n", i)
                if nl < 0:
                    break
                i = nl
                continue
            if c in "'\"" and not quoted_context:
                q = None if q == c else (c if q is None else q)
                out.append(c)
                i += 1
                continue
            if c == "$" and i + 1 < len(text):
                value, end = self._dollar(text, i, line)
                if value is not None:
                    out.append(_escape(value, q == '"' or quoted_context))
                    i = end
                    continue
            if c == "`":
                end = text.find("`", i + 1)
                end = len(text) - 1 if end < 0 else end
                self.notes.append(f"line {line}: `{text[i + 1:end]}` is a command; not run, kept as written")
                out.append(_escape(text[i:end + 1], True))
                i = end + 1
                continue
            out.append(c)
            i += 1
        return "".join(out)

    def _dollar(self, text: str, i: int, line: int) -> tuple[str | None, int]:
        nxt = text[i + 1]
        if nxt == "{":
            end = _matching(text, i + 1, "{", "}")
            if end < 0:
                return None, i + 1
            value = self._braced(text[i + 2:end], line)
            if value is None:
                self.notes.append(f"line {line}: ${{{text[i + 2:end]}}} is not followed; kept as written")
                return text[i:end + 1], end + 1
            return value, end + 1
        if nxt == "(":
            end = _matching(text, i + 1, "(", ")")
            end = len(text) - 1 if end < 0 else end
            body = text[i + 2:end]
            if _SCRIPT_DIR_RE.search(body) and self.folder is not None:
                return self.folder, end + 1
            self.notes.append(f"line {line}: $({body}) is a command; not run, kept as written")
            return text[i:end + 1], end + 1
        if nxt in "@*" or nxt.isdigit():
            return self._lookup(nxt, line), i + 2
        m = _NAME_RE.match(text, i + 1)
        if m is None:
            return None, i + 1
        return self._lookup(m.group(0), line), m.end()


def parse_script(text: str, folder: str | None = None) -> ShellScript:
    """The commands of a shell script, variables expanded as bash would, nothing run.

    Args:
        text: the script.
        folder: the script's own folder, for ``$(dirname "$0")`` and the like.

    Raises:
        ShellError: a quote is never closed.
    """
    variables: dict[str, str] = {}
    notes: list[str] = []
    expander = _Expander(variables, folder, notes)
    commands: list[Command] = []
    for start, line in logical_lines(text):
        expanded = expander.expand(line, start)
        try:
            words = shlex.split(expanded, comments=False, posix=True)
        except ValueError as exc:
            notes.append(f"line {start}: cannot split into words ({exc}); skipped")
            continue
        words = [w.replace(_NO_ARGS, "") for w in words if w != _NO_ARGS]
        if not words:
            continue
        exported = words[0] in ("export", "declare", "local", "readonly")
        if exported:
            words = [w for w in words[1:] if not w.startswith("-")]
        env: dict[str, str] = {}
        while words and (m := _ASSIGN_RE.match(words[0])):
            env[m.group(1)] = m.group(2)
            words = words[1:]
        if not words or exported:
            variables.update(env)
            continue
        commands.append(Command(tuple(words), env, start))
    return ShellScript(commands, variables, notes)
