"""Shell scripts read, never run: the commands of a launch script such as MiniCPM-o's finetune_ds.sh.

Part of the readers (`planner.explain.readers`, the edge of the flow beside the writers). It follows the
parts of bash that launch scripts use: ``VAR=value`` and ``export VAR=value``; ``$VAR``,
``${VAR}``, ``${VAR:-default}`` expanded outside single quotes, word-split when unquoted;
backslash-newline continuations; quotes spanning lines; ``#`` comments. Words are then split by
`shlex`'s POSIX rules (`split_words`). Nothing is executed: a command substitution ``$(...)``
stays as written and is reported, except the idiom scripts use for their own folder (``$(cd
"$(dirname "${BASH_SOURCE[0]}")" && pwd)``, ``$(dirname "$0")``), which becomes the script's folder.

Every pass is linear in the script's length (one quote scan, brackets matched once per line), and
expansion is bounded (`MAX_VALUE_CHARS`, `MAX_EXPANSIONS`, `MAX_EXPANDED_CHARS`,
`MAX_EXPANSION_DEPTH`): a hostile script is refused in well under a second, never followed for ever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGN_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
_SCRIPT_DIR_RE = re.compile(r"dirname\s+\"?\$(\{BASH_SOURCE(\[0\])?\}|BASH_SOURCE|0|\{0\})\"?")
_WORD_BREAK = " \t\n;|&()"
_NO_ARGS = "\x00"
"""What ``"$@"`` expands to: the script's own arguments, none when it is read; such a word is dropped."""

MAX_VALUE_CHARS = 64 * 1024
"""Longest value a variable may hold after expansion, characters. finetune_ds.sh's longest
(DISTRIBUTED_ARGS, the launcher's flags) is 108; ``A=$A$A`` repeated doubles at each line and
stops here after 16 lines."""
MAX_EXPANSIONS = 10_000
"""Most variable expansions (``$A``, ``${A:-x}``) followed in one script; finetune_ds.sh makes 11."""
MAX_EXPANDED_CHARS = 1024 * 1024
"""Most characters all expansions of one script may insert, together: as much again as explain's
1 MiB file limit, so that what follows the expansion stays linear in a bounded text."""
MAX_EXPANSION_DEPTH = 16
"""Deepest ``${A:-${B:-...}}`` followed; each level is a call, and real scripts nest 1 or 2."""
MAX_NOTES = 20
"""Notes kept per script (a variable not set, a command not run); the rest are counted in one."""


class ShellError(ValueError):
    """The script cannot be read: an unclosed quote at its end, or a limit on expansion passed."""


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


_Scan = tuple[str | None, bool, bool, str]
"""Where the quote scan stands after some text: the open quote (``'``, ``"`` or None), whether the
next character is escaped by a backslash, whether a ``#`` comment runs to the end of the logical
line, and the last character seen (a ``#`` after a word break starts a comment)."""
_START: _Scan = (None, False, False, "\n")
_QUOTE_SPECIAL = re.compile(r"[\\'\"#]")


def _advance(state: _Scan, text: str) -> _Scan:
    """The scan's state after ``text``: each character looked at once, so that a script with a quote
    open over many lines costs its length, not its length squared (the scan used to start again at
    each line)."""
    if not text:
        return state
    q, escaped, comment, prev = state
    if comment:
        return q, False, True, text[-1]
    i, n = (1, len(text)) if escaped else (0, len(text))
    escaped = False
    while i < n:
        if q == "'":
            j = text.find("'", i)
            if j < 0:
                break
            q, i = None, j + 1
            continue
        m = _QUOTE_SPECIAL.search(text, i)
        if m is None:
            break
        j, c = m.start(), m.group()
        if c == "\\":
            if j + 1 == n:
                escaped = True
            i = j + 2
        elif c == "#":
            if q is None and (text[j - 1] if j else prev) in _WORD_BREAK:
                nl = text.find("\n", j)
                if nl < 0:
                    return None, False, True, text[-1]
                i = nl + 1
            else:
                i = j + 1
        else:
            q = c if q is None else None if q == c else q
            i = j + 1
    return q, escaped, comment, text[-1]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each logical line: continuations joined, quotes closed.

    Raises:
        ShellError: a quote is still open at the end of the script.
    """
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    state, start = _START, 0
    for n, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = n
        stripped = line.rstrip("\r")
        trailing = len(stripped) - len(stripped.rstrip("\\"))
        if trailing % 2 == 1:
            before = _advance(state, stripped[:-1])
            if before[0] != "'":  # backslash-newline (outside single quotes): removed, the line goes on
                buf.append(stripped[:-1])
                state = before
                continue
            state = _advance(before, stripped[-1])
        else:
            state = _advance(state, stripped)
        buf.append(stripped)
        if state[0] is not None:
            buf.append("\n")
            state = _advance(state, "\n")
            continue
        out.append((start, "".join(buf)))
        buf, state = [], _START
    if buf:
        if state[0] is not None:
            raise ShellError(f"line {start}: a quote opened here is never closed")
        out.append((start, "".join(buf)))
    return out


def _escape(value: str, quoted: bool) -> str:
    """A value inserted into the line so that `split_words` reads it back literally (split on whitespace
    only when not ``quoted``)."""
    if quoted:
        return value.replace("\\", "\\\\").replace('"', '\\"')
    return re.sub(r"([\\'\"])", r"\\\1", value)


def _pairs(text: str, open_: str, close: str) -> dict[int, int]:
    """Each opening bracket's index -> the index of the one closing it (unclosed ones left out),
    matched with a stack in one pass: what scanning forward from each opening bracket would find,
    without doing that scan once per bracket."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for m in re.finditer(re.escape(open_) + "|" + re.escape(close), text):
        if m.group() == open_:
            stack.append(m.start())
        elif stack:
            pairs[stack.pop()] = m.start()
    return pairs


_EXPAND_SPECIAL = re.compile(r"[\\#'\"$`]")


class _Expander:
    """Expands one script's lines in order, with its variables, within the limits on expansion."""

    def __init__(self, variables: dict[str, str], folder: str | None, notes: list[str]) -> None:
        self.vars = variables
        self.folder = folder
        self.notes = notes
        self.dropped_notes = 0
        self.expansions = 0
        self.inserted = 0
        self.depth = 0
        self._pair_cache: dict[tuple[str, str], dict[int, int]] = {}
        self._origins: dict[str, tuple[str, int]] = {}
        """A ``${A:-default}``'s default -> (the text it is in, its offset there): its brackets are
        looked up in that text's pairs, not matched again at each level of nesting."""

    def note(self, text: str) -> None:
        """Keep a note, up to `MAX_NOTES`; count the rest."""
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        else:
            self.dropped_notes += 1

    def assign(self, name: str, value: str, line: int) -> None:
        """Set a variable, refusing a value over `MAX_VALUE_CHARS`."""
        check_value(name, value, line)
        self.vars[name] = value

    def _matching(self, text: str, i: int, open_: str, close: str) -> int:
        """Index of the bracket closing the one at ``i``, or -1."""
        origin = self._origins.get(text)
        if origin is not None:  # the same pair in the enclosing text, if it closes within this one
            outer, offset = origin
            j = self._matching(outer, i + offset, open_, close) - offset
            return j if 0 <= j < len(text) else -1
        pairs = self._pair_cache.get((text, open_))
        if pairs is None:
            pairs = self._pair_cache[(text, open_)] = _pairs(text, open_, close)
        return pairs.get(i, -1)

    def expand_line(self, text: str, line: int) -> str:
        """One logical line expanded (the bracket pairs of earlier lines forgotten)."""
        self._pair_cache.clear()
        self._origins.clear()
        return self.expand(text, line)

    def _lookup(self, name: str, line: int) -> str:
        if name in self.vars:
            return self.vars[name]
        if name in ("@", "*"):
            return _NO_ARGS
        if name not in ("@", "*") and not name.isdigit():
            self.note(f"line {line}: ${name} is not set in the script; taken as empty")
        return ""

    def _braced(self, text: str, start: int, end: int, line: int) -> str | None:
        """``${...}`` (its body is ``text[start:end]``): the value, or None when not a form followed."""
        body = text[start:end]
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
        if default:
            self._origins[default] = (text, start + m.start(3))
        default = self.expand(default or "", line, quoted_context=True)
        if op.endswith("="):
            self.assign(name, default, line)
        return default

    def _spend(self, value: str, line: int) -> None:
        """Count one expansion of ``value`` against `MAX_EXPANSIONS` and `MAX_EXPANDED_CHARS`."""
        self.expansions += 1
        self.inserted += len(value)
        if self.expansions > MAX_EXPANSIONS:
            raise ShellError(f"line {line}: over {MAX_EXPANSIONS} variable expansions, explain's limit for one "
                             "script (a launch script makes a few dozen)")
        if self.inserted > MAX_EXPANDED_CHARS:
            raise ShellError(f"line {line}: variable expansion inserts over {MAX_EXPANDED_CHARS} characters, "
                             "explain's limit for one script (as much again as its 1 MiB file limit)")

    def expand(self, text: str, line: int, quoted_context: bool = False) -> str:
        """``text`` with variables expanded and comments removed, ready for `split_words`.

        Raises:
            ShellError: a limit on expansion is passed.
        """
        self.depth += 1
        try:
            if self.depth > MAX_EXPANSION_DEPTH:
                raise ShellError(f"line {line}: ${{...}} nested over {MAX_EXPANSION_DEPTH} deep, explain's limit "
                                 "(a launch script nests 1 or 2)")
            return self._expand(text, line, quoted_context)
        finally:
            self.depth -= 1

    def _expand(self, text: str, line: int, quoted_context: bool) -> str:
        out: list[str] = []
        q: str | None = '"' if quoted_context else None
        i, n = 0, len(text)
        while i < n:
            if q == "'":  # literal up to and with the closing quote
                j = text.find("'", i)
                j = n - 1 if j < 0 else j
                out.append(text[i:j + 1])
                q = None if text[j] == "'" else q
                i = j + 1
                continue
            m = _EXPAND_SPECIAL.search(text, i)
            if m is None:
                out.append(text[i:])
                break
            if m.start() > i:  # ordinary characters, copied as they are
                out.append(text[i:m.start()])
                i = m.start()
            c = text[i]
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
            if c == "$" and i + 1 < n:
                value, end = self._dollar(text, i, line)
                if value is not None:
                    escaped = _escape(value, q == '"' or quoted_context)
                    self._spend(escaped, line)
                    out.append(escaped)
                    i = end
                    continue
            if c == "`":
                end = text.find("`", i + 1)
                end = n - 1 if end < 0 else end
                self.note(f"line {line}: `{text[i + 1:end]}` is a command; not run, kept as written")
                out.append(_escape(text[i:end + 1], True))
                i = end + 1
                continue
            out.append(c)
            i += 1
        return "".join(out)

    def _dollar(self, text: str, i: int, line: int) -> tuple[str | None, int]:
        nxt = text[i + 1]
        if nxt == "{":
            end = self._matching(text, i + 1, "{", "}")
            if end < 0:
                return None, i + 1
            value = self._braced(text, i + 2, end, line)
            if value is None:
                self.note(f"line {line}: ${{{text[i + 2:end]}}} is not followed; kept as written")
                return text[i:end + 1], end + 1
            return value, end + 1
        if nxt == "(":
            end = self._matching(text, i + 1, "(", ")")
            end = len(text) - 1 if end < 0 else end
            body = text[i + 2:end]
            if _SCRIPT_DIR_RE.search(body) and self.folder is not None:
                return self.folder, end + 1
            self.note(f"line {line}: $({body}) is a command; not run, kept as written")
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
        ShellError: a quote is never closed, or a limit on expansion is passed.
    """
    variables: dict[str, str] = {}
    notes: list[str] = []
    expander = _Expander(variables, folder, notes)
    commands: list[Command] = []
    for start, line in logical_lines(text):
        expanded = expander.expand_line(line, start)
        try:
            words = split_words(expanded)
        except ValueError as exc:
            expander.note(f"line {start}: cannot split into words ({exc}); skipped")
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
        for name, value in env.items():
            check_value(name, value, start)
        if not words or exported:
            variables.update(env)
            continue
        commands.append(Command(tuple(words), env, start))
    if expander.dropped_notes:
        notes.append(f"{expander.dropped_notes} more notes like these not shown (explain keeps {MAX_NOTES})")
    return ShellScript(commands, variables, notes)


_WORD_PART = re.compile(r"""
    (?P<space>[ \t\r\n]+)
  | '(?P<single>[^']*)'
  | "(?P<double>(?:[^"\\]|\\.)*)"
  | \\(?P<escaped>.)
  | (?P<plain>[^ \t\r\n'"\\]+)
  | (?P<bad>.)
""", re.S | re.X)
_DOUBLE_ESCAPE = re.compile(r'\\(.)', re.S)


def split_words(text: str) -> list[str]:
    """``shlex.split(text, posix=True)`` (no comments), in linear time: shlex builds each word a
    character at a time (``token = token + c``), quadratic in a word's length, and a 1 MiB word
    took it half a minute. Each alternative of `_WORD_PART` matches one way only, so even a failed
    match backtracks in linear time.

    Raises:
        ValueError: a quote is not closed, or a backslash ends the text (shlex's messages).
    """
    words: list[str] = []
    word: list[str] | None = None
    for m in _WORD_PART.finditer(text):
        kind = m.lastgroup
        if kind == "space":
            if word is not None:
                words.append("".join(word))
                word = None
            continue
        if kind == "bad":
            raise ValueError("No escaped character" if m.group() == "\\" else "No closing quotation")
        if word is None:
            word = []
        if kind == "double":
            word.append(_DOUBLE_ESCAPE.sub(lambda e: e.group(1) if e.group(1) in '"\\' else e.group(0),
                                           m.group("double")))
        else:
            word.append(m.group(kind))
    if word is not None:
        words.append("".join(word))
    return words


def check_value(name: str, value: str, line: int) -> None:
    """Refuse a variable's value over `MAX_VALUE_CHARS`.

    Raises:
        ShellError: it is.
    """
    if len(value) > MAX_VALUE_CHARS:
        raise ShellError(f"line {line}: ${name} would hold {len(value)} characters, over explain's limit of "
                         f"{MAX_VALUE_CHARS} for one variable's value")
