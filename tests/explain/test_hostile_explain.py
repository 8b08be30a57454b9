"""`memplan explain` on hostile input: every file it is given, and every argument string, is refused
with one clear line (exit 2) within a time limit, never a traceback, a hang or an "internal error".

One parametrized test per class of input the tester found (non-finite numbers, deep nesting,
special files, NUL bytes, non-UTF-8, oversized files, YAML alias bombs, shell-reader blowups,
numbers too large), each case built in ``tmp_path`` and run through the shared harness
`tests.hostile.assert_refused`; then ordinary files, to show the limits leave them alone.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from planner.explain.inputs import MAX_FILE_BYTES, MAX_NESTING, MAX_YAML_NODES, load_json
from planner.explain.shell import (
    MAX_EXPANDED_CHARS,
    MAX_EXPANSION_DEPTH,
    MAX_EXPANSIONS,
    MAX_VALUE_CHARS,
    parse_script,
    split_words,
)
from tests.hostile import assert_refused, run_cli

DATA = Path(__file__).parents[1] / "data" / "explain"
SETUP = ["--model", "minicpm-o-2.6", "--gpus", "2x3090", "--host-ram", "64GiB"]
"""Everything but the files, so a refusal can only come from reading them."""
SECONDS = 20
"""Time limit per refused case. Each is answered in well under a second; the margin is for a
machine shared with other test runs (a run here once went twenty times slower under load)."""
MIB = 1024 * 1024
UNDER_CAP = MAX_FILE_BYTES - 4096
"""Just under the file limit: the largest input the parsers themselves must answer quickly."""
LAUNCH = "torchrun --nproc_per_node 2 finetune.py --bf16 true --model_max_length 2048\n"
LF_HEAD = "stage: sft\nfinetuning_type: full\n"

Build = Callable[[Path], list[str]]
"""Writes a case's files into the sandbox folder and returns explain's arguments."""


def file(name: str, content: str | bytes) -> Build:
    def build(root: Path) -> list[str]:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return [name]

    return build


def args(text: str) -> Build:
    return lambda root: ["--args", text]


def refused(case: tuple[str, Build, str], tmp_path: Path) -> None:
    _, build, match = case
    argv = build(tmp_path)
    assert_refused(["explain", *argv, *SETUP], cwd=tmp_path, match=match, seconds=SECONDS)


def ids(cases: list[tuple[str, Build, str]]) -> list[str]:
    return [c[0] for c in cases]


# --- non-finite numbers: strict JSON, finite argument values --------------------------------------

NON_FINITE = [
    ("json-nan", file("ds.json", '{"zero_optimization": {"stage": NaN}}'),
     r"ds\.json: zero_optimization\.stage is NaN, not strict JSON"),
    ("json-infinity", file("ds.json", '{"train_micro_batch_size_per_gpu": 1, "gradient_clipping": Infinity}'),
     r"gradient_clipping is Infinity, not strict JSON"),
    ("json-minus-infinity", file("ds.json", '{"zero_optimization": {"stage": 3, "sub_group_size": -Infinity}}'),
     r"zero_optimization\.sub_group_size is -Infinity"),
    ("json-overflow-1e999", file("ds.json", '{"train_micro_batch_size_per_gpu": 1e999}'),
     r"train_micro_batch_size_per_gpu is 1e999, not strict JSON"),
    ("json-in-list", file("ds.json", '{"zero_optimization": {"stage": 3}, "optimizer": {"betas": [0.9, NaN]}}'),
     r"optimizer\.betas\[1\] is NaN"),
    ("args-inf", args("--per_device_train_batch_size inf"),
     r"--per_device_train_batch_size: 'inf' is not a finite number"),
    ("args-nan", args("--model_max_length nan --bf16 true"), r"--model_max_length: 'nan' is not a finite number"),
    ("args-Infinity-float", args("--learning_rate Infinity --bf16 true"),
     r"--learning_rate: 'Infinity' is not a finite number"),
    ("args-1e999", args("--gradient_accumulation_steps=1e999"), r"'1e999' is not a finite number"),
    ("yaml-inf", file("train.yaml", LF_HEAD + "cutoff_len: .inf\n"), r"cutoff_len: inf is not a finite number"),
]


@pytest.mark.parametrize("case", NON_FINITE, ids=ids(NON_FINITE))
def test_non_finite_numbers_are_refused(case, tmp_path: Path):
    refused(case, tmp_path)


# --- nesting: checked before any recursion --------------------------------------------------------

DEPTH = 100_000
"""As deep as the tester's JSON: far past Python's recursion limit (1000)."""
NESTING = [
    ("json-arrays", file("deep.json", "[" * DEPTH + "]" * DEPTH),
     rf"deep\.json: nested deeper than explain's limit of {MAX_NESTING} levels"),
    ("json-objects", file("deep.json", '{"a":' * DEPTH + "1" + "}" * DEPTH),
     rf"nested deeper than explain's limit of {MAX_NESTING} levels"),
    ("yaml-flow", file("deep.yaml", LF_HEAD + "x: " + "[" * DEPTH + "]" * DEPTH + "\n"),
     rf"deep\.yaml: nested deeper than explain's limit of {MAX_NESTING} levels"),
    ("yaml-inline-deepspeed-json", file("t.yaml", LF_HEAD + "deepspeed: '" + "{\"a\": " * DEPTH + "'\n"),
     rf"inline DeepSpeed JSON: nested deeper than explain's limit of {MAX_NESTING}"),
    ("shell-default-in-default", file("run.sh", "echo " + "${A:-" * DEPTH + "}" * DEPTH + "\n" + LAUNCH),
     rf"run\.sh: line 1: \$\{{\.\.\.\}} nested over {MAX_EXPANSION_DEPTH} deep"),
]


@pytest.mark.parametrize("case", NESTING, ids=ids(NESTING))
def test_deep_nesting_is_refused(case, tmp_path: Path):
    refused(case, tmp_path)


# --- what is not a regular file -------------------------------------------------------------------


def fifo(root: Path) -> list[str]:
    os.mkfifo(root / "ds.json")  # opening it to read would wait for a writer for ever
    return ["ds.json"]


def link_to_fifo(root: Path) -> list[str]:
    os.mkfifo(root / "pipe")
    (root / "run.sh").symlink_to("pipe")
    return ["run.sh"]


def symlink_loop(root: Path) -> list[str]:
    (root / "a.json").symlink_to("b.json")
    (root / "b.json").symlink_to("a.json")
    return ["a.json"]


def folder(root: Path) -> list[str]:
    (root / "configs").mkdir()
    return ["configs"]


def names_a_fifo(root: Path) -> list[str]:
    os.mkfifo(root / "ds_z3.json")  # the YAML's deepspeed: file, read because the YAML names it
    (root / "train.yaml").write_text(LF_HEAD + "deepspeed: ds_z3.json\n")
    return ["train.yaml"]


SPECIAL = [
    ("dev-zero", lambda root: ["/dev/zero"], r"/dev/zero: a character device, not a regular file"),
    ("fifo", fifo, r"ds\.json: a FIFO \(named pipe\), not a regular file"),
    ("symlink-to-fifo", link_to_fifo, r"run\.sh: a FIFO"),
    ("fifo-named-by-a-yaml", names_a_fifo, r"ds_z3\.json: a FIFO"),
    ("folder", folder, r"configs: a folder, not a regular file"),
    ("symlink-loop", symlink_loop, r"a\.json: cannot read: Too many levels of symbolic links"),
    ("missing", lambda root: ["nothere.json"], r"nothere\.json: cannot read: No such file"),
]


@pytest.mark.parametrize("case", SPECIAL, ids=ids(SPECIAL))
def test_files_that_are_not_regular_are_refused(case, tmp_path: Path):
    refused(case, tmp_path)


# --- NUL bytes ------------------------------------------------------------------------------------

NUL = [
    ("in-path", lambda root: ["ds\x00.json"], r"a file name cannot hold a NUL byte"),
    ("in-file", file("run.sh", LAUNCH.replace("true", "tr\x00ue")), r"run\.sh: a NUL byte at offset \d+: not a text"),
    ("in-args", args("--bf16 true\x00"), r"--args #1: a NUL byte at offset 11"),
    ("in-yaml-deepspeed-path", file("t.yaml", LF_HEAD + 'deepspeed: "ds\\0.json"\n'),
     r"t\.yaml: deepspeed: .* holds a NUL byte"),
    ("in-json-deepspeed-path", file("args.json", '{"output_dir": "o", "deepspeed": "ds\\u0000.json"}'),
     r"args\.json: deepspeed: .* holds a NUL byte"),
]


@pytest.mark.parametrize("case", NUL, ids=ids(NUL))
def test_nul_bytes_are_refused(case, tmp_path: Path):
    refused(case, tmp_path)


# --- text that is not UTF-8 -----------------------------------------------------------------------

NOT_UTF8 = [
    ("latin-1", file("ds.json", '{"zero_optimization": {"stage": 3}, "x": "é"}'.encode("latin-1")),
     r"ds\.json: not UTF-8 text \(byte 0xe9 at offset 42\)"),
    ("utf-16", file("run.sh", LAUNCH.encode("utf-16")), r"run\.sh: not UTF-8 text \(byte 0xff at offset 0\)"),
    ("binary", file("train.yaml", bytes(range(128, 256)) * 4), r"train\.yaml: not UTF-8 text"),
]


@pytest.mark.parametrize("case", NOT_UTF8, ids=ids(NOT_UTF8))
def test_text_that_is_not_utf8_is_refused(case, tmp_path: Path):
    refused(case, tmp_path)


# --- sizes ----------------------------------------------------------------------------------------

BIG = 50 * MIB


def repeated(name: str, line: str, size: int, head: str = "") -> Build:
    """A file of ``size`` bytes or a little more: ``head`` then ``line`` again and again, written
    when the case runs (not held in memory by the test module)."""

    def build(root: Path) -> list[str]:
        with open(root / name, "w") as fh:
            fh.write(head)
            fh.write(line * ((size - len(head)) // len(line) + 1))
        return [name]

    return build


SIZES = [
    ("script-50MB", repeated("run.sh", LAUNCH, BIG),
     r"run\.sh: 5\d{7} bytes is over explain's 1 MiB limit for one file"),
    ("yaml-50MB", repeated("train.yaml", "cutoff_len: 1024\n", BIG, LF_HEAD),
     r"train\.yaml: 5\d{7} bytes is over explain's 1 MiB limit"),
    ("json-2MB", repeated("ds.json", " ", 2 * MIB, '{"zero_optimization": {"stage": 3}}'),
     r"ds\.json: 2\d{6} bytes is over explain's 1 MiB limit"),
    ("script-2MB-unclosed-quote", repeated("run.sh", "  --x 1\n", 2 * MIB, "torchrun finetune.py --deepspeed 'x\n"),
     r"run\.sh: 2\d{6} bytes is over explain's 1 MiB limit"),
    ("one-byte-over", file("run.sh", LAUNCH + "#" * (MAX_FILE_BYTES + 1 - len(LAUNCH))),
     rf"run\.sh: {MAX_FILE_BYTES + 1} bytes is over explain's 1 MiB limit"),
    ("args-over-1MiB", args("--bf16 true " + "x" * MAX_FILE_BYTES),
     r"--args #1: \d+ characters is over explain's 1 MiB limit for one file or argument string"),
]


@pytest.mark.parametrize("case", SIZES, ids=ids(SIZES))
def test_oversized_input_is_refused(case, tmp_path: Path):
    refused(case, tmp_path)


# --- YAML aliases ---------------------------------------------------------------------------------


def billion_laughs() -> str:
    """Nine aliases of nine, nine levels: 10^9 nodes once expanded, 1 KiB as written."""
    names = "abcdefghi"
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip(names, names[1:], strict=False)]
    return LF_HEAD + "\n".join(lines) + "\ncutoff_len: *i\n"


YAML_ALIASES = [
    ("billion-laughs", file("train.yaml", billion_laughs()),
     rf"train\.yaml: over {MAX_YAML_NODES} YAML nodes with its aliases expanded, explain's limit"),
    ("alias-contains-itself", file("train.yaml", LF_HEAD + "dataset: &d [*d]\n"),
     r"train\.yaml: the alias \*d at line 3 is inside the collection it names: it would contain itself"),
    ("mapping-contains-itself", file("train.yaml", LF_HEAD + "x: &m {a: 1, b: {c: *m}}\n"),
     r"the alias \*m at line 3 is inside the collection it names"),
    ("wide-flow-list", file("train.yaml", LF_HEAD + "dataset: [" + "1," * (UNDER_CAP // 2) + "]\n"),
     rf"over {MAX_YAML_NODES} YAML nodes with its aliases expanded"),
]


@pytest.mark.parametrize("case", YAML_ALIASES, ids=ids(YAML_ALIASES))
def test_yaml_alias_bombs_are_refused(case, tmp_path: Path):
    refused(case, tmp_path)


# --- the shell reader: linear scans, bounded expansion --------------------------------------------

SHELL = [
    ("unclosed-quote-near-1MiB", repeated("run.sh", "  --x 1\n", UNDER_CAP, "torchrun finetune.py --deepspeed 'x\n"),
     r"run\.sh: line 1: a quote opened here is never closed"),
    ("unclosed-double-quote-one-line", file("run.sh", 'torchrun finetune.py --deepspeed "' + "\\x" * (UNDER_CAP // 2)),
     r"line 1: a quote opened here is never closed"),
    ("doubling-A=$A$A-40-times", file("run.sh", "A=x\n" + "A=$A$A\n" * 40 + LAUNCH),
     rf"run\.sh: line 18: \$A would hold 131072 characters, over explain's limit of {MAX_VALUE_CHARS}"),
    ("doubling-with-default", file("run.sh", "A=x\n" + 'A="${A:-y}${A}"\n' * 40 + LAUNCH),
     rf"\$A would hold \d+ characters, over explain's limit of {MAX_VALUE_CHARS}"),
    ("many-expansions", file("run.sh", "X=1\n" + "echo $X $X $X $X $X\n" * 3000 + LAUNCH),
     rf"over {MAX_EXPANSIONS} variable expansions, explain's limit for one script"),
    ("expanded-characters", file("run.sh", "A=" + "y" * 60_000 + "\n" + "echo" + " $A" * 20 + "\n" + LAUNCH),
     rf"line 2: variable expansion inserts over {MAX_EXPANDED_CHARS} characters, explain's limit"),
    ("args-doubling", args("A=x\n" + "A=$A$A\n" * 40 + "--bf16 true"),
     rf"--args #1: line 18: \$A would hold \d+ characters, over explain's limit of {MAX_VALUE_CHARS}"),
]


@pytest.mark.parametrize("case", SHELL, ids=ids(SHELL))
def test_shell_blowups_are_refused(case, tmp_path: Path):
    refused(case, tmp_path)


@pytest.mark.parametrize("text", [
    "echo " + "${" * (UNDER_CAP // 2),  # each unclosed ${ used to scan to the end of the line
    "echo " + "$(" * (UNDER_CAP // 2),
    "echo " + "`" * (UNDER_CAP // 2),
    "echo " + "x" * UNDER_CAP,  # one word of 1 MiB: shlex builds words a character at a time
    "echo '" + "x\n" * (UNDER_CAP // 2) + "'",  # a quote open over half a million lines
    "X=1\n" + "echo $X $U\n" * 3000,  # thousands of notes, kept to a few
], ids=["unclosed-braces", "unclosed-parens", "backticks", "one-long-word", "quote-over-many-lines", "notes"])
def test_the_shell_reader_is_linear(text: str):
    """What the shell reader accepts near the file limit, it reads in about a second at most. The
    quadratic reader took 74 s for 64 KiB of unclosed ``${`` and 120 s for a quote open over 32,768
    lines; 3 s of wall time leaves room for a shared machine."""
    start = time.perf_counter()
    script = parse_script(text)
    assert time.perf_counter() - start < 3
    assert len(script.notes) <= 21


# --- numbers past what is read --------------------------------------------------------------------

NUMBERS = [
    ("json-5000-digits", file("ds.json", '{"train_micro_batch_size_per_gpu": ' + "1" * 5000 + "}"),
     r"ds\.json: not valid JSON: a number with more digits than Python reads \(4300\)"),
    ("yaml-5000-digits", file("train.yaml", LF_HEAD + "cutoff_len: " + "1" * 5000 + "\n"),
     r"train\.yaml: not valid YAML: a number with more digits than Python reads"),
    ("json-beyond-2^63", file("ds.json", '{"train_micro_batch_size_per_gpu": ' + "9" * 30 + "}"),
     r"train_micro_batch_size_per_gpu: 9+ is beyond explain's limit of 2\^63 for a number"),
    ("args-beyond-2^63", args("--per_device_train_batch_size 99999999999999999999999"),
     r"'99999999999999999999999' is beyond explain's limit of 2\^63"),
    ("args-1e300", args("--model_max_length 1e300"), r"'1e300' is beyond explain's limit of 2\^63"),
]


@pytest.mark.parametrize("case", NUMBERS, ids=ids(NUMBERS))
def test_numbers_too_large_are_refused(case, tmp_path: Path):
    refused(case, tmp_path)


# --- ordinary files still read right --------------------------------------------------------------


def explain_json(argv: list[str], cwd: Path) -> dict:
    outcome = run_cli(["explain", *argv, "--json"], cwd, seconds=60)
    assert outcome.exit_code == 0, outcome.stderr
    return json.loads(outcome.stdout)


def test_the_reference_script_still_reads(tmp_path: Path):
    """The reference launch script (names its ZeRO-3 JSON, read from beside it): the limits leave it
    as it was, the settings read as test_explain reads them."""
    for name in ("finetune_ds.sh", "ds_config_zero3.json"):
        shutil.copy(DATA / name, tmp_path / name)
    doc = explain_json(["finetune_ds.sh", "--gpus", "3090", "--host-ram", "64GiB"], tmp_path)
    assert doc["trainer"] == "minicpm" and doc["options"]["zero"] == 3 and doc["workload"]["seq_len"] == 1024


def test_ordinary_variants_read_right(tmp_path: Path):
    """A DeepSpeed JSON saved by a Windows editor (byte-order mark, CRLF), a LLaMA-Factory YAML with
    an anchor and an alias, and non-ASCII comments: all read, with their values."""
    ds = (DATA / "ds_z3.json").read_text().replace("\n", "\r\n")
    (tmp_path / "ds_z3.json").write_bytes(b"\xef\xbb\xbf" + ds.encode())
    yaml_text = (DATA / "llamafactory_full_z3.yaml").read_text()
    yaml_text = "# réglages d'entraînement ✓\n" + yaml_text.replace("cutoff_len: 2048", "cutoff_len: &len 2048\n"
                                                                      "eval_cutoff: *len")
    (tmp_path / "train.yaml").write_text(yaml_text)
    doc = explain_json(["train.yaml", "--model", "minicpm-o-2.6", "--gpus", "4xa100-80gb", "--host-ram", "512GiB"],
                       tmp_path)
    assert doc["options"]["zero"] == 3 and doc["workload"]["seq_len"] == 2048
    assert any(u["key"] == "eval_cutoff" for u in doc["unknown"])


def test_brackets_in_json_strings_do_not_count_as_nesting():
    """The depth scan skips strings, escaped quotes included: a DeepSpeed JSON whose strings hold
    brackets reads as it is."""
    doc = {"zero_optimization": {"stage": 3}, "note": "[" * 100 + '\\"' + "{" * 100, "x": {"y": {"z": 1.5}}}
    assert load_json(json.dumps(doc), "ds.json") == doc
    assert load_json(json.dumps([[[[1]]]] * 3), "x.json") == [[[[1]]]] * 3


def test_the_word_splitter_agrees_with_shlex():
    """`split_words` is shlex.split(posix=True) without its quadratic cost, word for word."""
    for text in ['a "b c" d', "a 'b \"c' \\ d", 'x"y"z \'\' ""', '"a\\"b\\\\c\\d"', "\\a\\ b\t\nc",
                 '--c="two words" --flag --d \'$N\'']:
        assert split_words(text) == shlex.split(text, comments=False, posix=True), text
    for bad in ["'open", '"open', "end\\"]:
        with pytest.raises(ValueError):
            split_words(bad)
