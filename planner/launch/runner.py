"""Launch: a plan folder -> the command that runs it; run it, keep a record, and step down to the
next safer plan when the run dies of out-of-memory.

Last stage of the flow (plan -> writers -> **launch**). Commands are argv lists, never shell
strings: user values (paths, extra flags) are single words whatever they contain. Nothing is
started until everything a run needs is checked (`readiness`: the hostfile against the plan, the
data, the launcher, the attempts record): a missing file is one line from memplan, not a
traceback from a rank. Each attempt is recorded under ``PLAN_DIR/attempts/NN/``: the configs it
ran with, the command, the exit status, the failure recognised, the peak memory the run
reported, the time, its output, and why the loop stopped.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydantic import ValidationError

from planner.errors import ProfileError
from planner.plan import MAX_PLAN_BYTES, Plan
from planner.writers import FILES
from planner.writers.formats import NotExpressible, minicpm_flags
from planner.writers.scripts import hostfile as hostfile_template
from planner.writers.scripts import launcher_argv

RETRY_HEADROOM = 0.10
"""After an out-of-memory failure the next plan must need at least this fraction of the broken
budget's capacity less than the plan that failed (2.4 GiB on a 24 GiB GPU). The estimate missed
by an unknown amount; a tenth is more than the allocator slack and fragmentation spikes it does
not model (docs/runtime.md), and small enough that one step rarely gives up more than needed."""

OUTPUT_TAIL_LINES = 400
"""Lines of a run's output kept in memory to recognise how it failed."""

PEAK_RE = re.compile(r"memplan-train: (.*)$")

HOSTFILE_ENTRY = re.compile(r"^(\S+)\s+slots=(\d+)")
"""A line of DeepSpeed's hostfile, as its launcher matches it (deepspeed/launcher/runner.py,
``_parse_hostfile``): a host, blanks, ``slots=N``; the rest of the line is ignored. Blank lines and
lines starting with ``#`` are skipped."""

MAX_SMALL_FILE_BYTES = 2**20
"""A hostfile, a dataset_info.json or a llamafactory.yaml larger than 1 MiB is not one (bytes)."""

INTERRUPTED = 128 + signal.SIGINT
"""The exit status recorded for an attempt stopped with Ctrl-C (128 + SIGINT, as shells say)."""


class Target(StrEnum):
    """Which trainer runs the plan."""

    BUILTIN = "builtin"  # memplan train (planner.train): HF Trainer
    MINICPM = "minicpm"  # MiniCPM-o / MiniCPM-V finetune.py
    LLAMAFACTORY = "llamafactory"  # llamafactory-cli train


class Failure(StrEnum):
    """How a run ended, as far as memory goes."""

    GPU_OOM = "gpu"
    HOST_OOM = "host"
    OTHER = "other"
    INTERRUPTED = "interrupted"  # Ctrl-C: recorded, never retried


# (pattern, budget): messages of real out-of-memory failures, as the libraries print them.
OOM_PATTERNS: tuple[tuple[re.Pattern[str], Failure], ...] = tuple(
    (re.compile(p), f)
    for p, f in (
        # torch's caching allocator: "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate ..."
        (r"CUDA out of memory", Failure.GPU_OOM),
        (r"torch\.(cuda\.)?OutOfMemoryError", Failure.GPU_OOM),
        # cuBLAS / CUDA runtime / NCCL allocation failures inside kernels and collectives
        (r"CUBLAS_STATUS_ALLOC_FAILED", Failure.GPU_OOM),
        (r"CUDA error: out of memory", Failure.GPU_OOM),
        (r"cudaErrorMemoryAllocation", Failure.GPU_OOM),
        (r"NCCL (WARN|error).*(Cuda failure 'out of memory'|out of memory)", Failure.GPU_OOM),
        # host side: torch's CPU allocator, pinned buffers (DeepSpeed offload), C++ and errno ENOMEM
        (r"DefaultCPUAllocator: (can't|not enough memory)", Failure.HOST_OOM),
        (r"CUDA error: (OS call failed|out of memory).*cudaHostAlloc", Failure.HOST_OOM),
        (r"std::bad_alloc", Failure.HOST_OOM),
        (r"\[Errno 12\] Cannot allocate memory", Failure.HOST_OOM),
        (r"MemoryError", Failure.HOST_OOM),
        # the kernel's OOM killer: SIGKILL, as torchrun and the DeepSpeed launcher report a child's death
        (r"Signal 9 \(SIGKILL\) received by PID", Failure.HOST_OOM),
        (r"exitcode\s*:\s*-9\b", Failure.HOST_OOM),
        (r"exits with return code = -9\b", Failure.HOST_OOM),
    )
)


def classify(returncode: int, output: str) -> Failure | None:
    """None for success; which budget broke for an out-of-memory failure; OTHER otherwise.

    A process killed by SIGKILL (exit status 137 from a shell, -9 from Python) with no other
    message is the kernel's OOM killer in practice: nothing else in a training run sends it.
    """
    if returncode == 0:
        return None
    for pattern, failure in OOM_PATTERNS:
        if pattern.search(output):
            return failure
    if returncode in (137, -signal.SIGKILL):
        return Failure.HOST_OOM
    return Failure.OTHER


@dataclass(frozen=True)
class Command:
    """What to run: argv, the environment it adds, and where."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path

    def as_json(self) -> dict:
        """The command as recorded."""
        return {"argv": self.argv, "env": self.env, "cwd": str(self.cwd)}


def read_plan(plan_dir: Path) -> Plan:
    """The plan in ``plan_dir``.

    Raises:
        ProfileError: no such folder, no readable plan.json there, or not a plan this memplan reads.
    """
    path = plan_dir / "plan.json"
    try:
        if not plan_dir.is_dir():
            what = "not a folder" if os.path.lexists(plan_dir) else "no such folder"
            raise ProfileError(f"{plan_dir}: {what} (write a plan with memplan tune --out {plan_dir})")
        if not os.path.lexists(path):
            raise ProfileError(f"{plan_dir}: no plan.json (write one with memplan tune --out {plan_dir})")
        if not path.is_file():
            raise ProfileError(f"{path}: not a regular file")
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise ProfileError(f"{path}: {path.stat().st_size:,} bytes, too large to be a plan")
        return Plan.read(path)
    except ProfileError:
        raise
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "plan"
        raise ProfileError(f"{path}: not a plan this memplan can run ({loc}: {err['msg']})") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ProfileError(f"{path}: nested too deeply to be a plan") from None
    except ValueError as exc:  # Plan.read: another version, or not a plan at all
        message = str(exc).splitlines()[0] if str(exc) else "not a plan"
        raise ProfileError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def _no_nul(**values: str | Path | Sequence[str] | None) -> None:
    """A NUL byte cannot be in an argument or a path; say which option holds one."""
    for name, value in values.items():
        words = [value] if isinstance(value, str | Path) else list(value or ())
        if any("\x00" in str(w) for w in words):
            raise ProfileError(f"{name}: contains a NUL byte")


def hostfile_path(plan_dir: Path, plan: Plan, target: Target, hostfile: Path | None) -> Path | None:
    """The hostfile the command names: ``hostfile`` or ``PLAN_DIR/hostfile`` for a plan of several
    nodes started by DeepSpeed's launcher; None when nothing reads one.

    Raises:
        ProfileError: ``--hostfile`` given where nothing would read it (a one-node plan, which
            torchrun runs alone; LLaMA-Factory, which starts torchrun on each node).
    """
    if plan.cluster.nodes == 1:
        if hostfile is not None:
            raise ProfileError(f"--hostfile {hostfile}: the plan is for one node ({plan.cluster.gpus}), which torchrun "
                               "runs without a hostfile; drop --hostfile, or plan for several nodes "
                               "(memplan tune --gpus NODESxGPUSxNAME)")
        return None
    if target is Target.LLAMAFACTORY:
        if hostfile is not None:
            raise ProfileError(f"--hostfile {hostfile}: LLaMA-Factory starts torchrun on each node itself "
                               "(NODE_RANK, MASTER_ADDR, MASTER_PORT); it reads no hostfile")
        return None
    return Path(os.path.abspath(hostfile or plan_dir / "hostfile"))


def command(plan_dir: Path, plan: Plan, target: Target, script: Path | None = None, hostfile: Path | None = None,
            data: str | None = None, extra: Sequence[str] = ()) -> Command:
    """The command that runs ``plan`` from ``plan_dir`` with ``target``. What the run reads (the
    hostfile's content, the data) is checked by `readiness`, not here.

    Args:
        data: the training data; None: the plan's ``data_path``. A path given here is relative to
            the current folder and passed on absolute; the plan's own is relative to where the
            trainer runs, as in the scripts memplan writes.

    Raises:
        ProfileError: the target cannot run this plan, or needs something missing or unusable
            (the MiniCPM script, the LLaMA-Factory YAML), or an option that nothing would read.
    """
    _no_nul(**{"--script": script, "--hostfile": hostfile, "--data": data, "trainer arguments": extra})
    if data is not None and not data.strip():
        raise ProfileError("--data: needs a path")
    if script is not None and target is not Target.MINICPM:
        raise ProfileError(f"--script {script}: only --target minicpm runs a script (MiniCPM-o's finetune.py)")
    plan_dir = Path(os.path.abspath(plan_dir))
    data = os.path.abspath(os.path.expanduser(data)) if data is not None else None
    env: dict[str, str] = {}
    if plan.options.offload_optimizer.value != "none":
        # torchrun sets OMP_NUM_THREADS=1 for several ranks; CPU Adam wants its share of the cores.
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS",
                                                str(max(1, (os.cpu_count() or 1) // plan.cluster.gpus_per_node)))
    hf_path = hostfile_path(plan_dir, plan, target, hostfile)
    hf = str(hf_path) if hf_path else "hostfile"
    if target is Target.BUILTIN:
        program = ["planner.train", str(plan_dir), "--data", data or plan.trainer.data_path, *extra]
        return _checked(Command(launcher_argv(plan, program, hf, module=True), env, Path.cwd()), plan_dir)
    if target is Target.MINICPM:
        script = _script_file(script)
        try:
            flags = minicpm_flags(plan)
        except NotExpressible as exc:
            raise ProfileError(f"--target minicpm: {exc}") from None
        flags[flags.index("--deepspeed") + 1] = str(plan_dir / "ds_config.json")
        if data:
            flags[flags.index("--data_path") + 1] = data
        # finetune.py imports its own dataset.py and trainer.py: run it from its folder
        return _checked(Command(launcher_argv(plan, [str(script), *flags, *extra], hf), env, script.parent), plan_dir)
    yaml_path = plan_dir / "llamafactory.yaml"
    if not yaml_path.is_file():
        reason = plan.skipped.get("llamafactory.yaml", "no llamafactory.yaml in the plan folder")
        raise ProfileError(f"--target llamafactory: {reason}")
    env |= {"FORCE_TORCHRUN": "1", "NNODES": str(plan.cluster.nodes), "NPROC_PER_NODE": str(plan.cluster.gpus_per_node)}
    if plan.cluster.nodes > 1:  # LLaMA-Factory runs torchrun on each node; this is the local node's command
        env |= {k: os.environ[k] for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    argv = ["llamafactory-cli", "train", str(yaml_path), *extra]
    if data:
        argv += [f"dataset_dir={Path(data).parent}", f"dataset={Path(data).stem}"]
    return _checked(Command(argv, env, plan_dir), plan_dir)


def _checked(cmd: Command, plan_dir: Path) -> Command:
    """``cmd``, unless a word of it holds a NUL byte, which no program can be given: the options
    were checked, so it came from plan.json."""
    if any("\x00" in word for word in [*cmd.argv, *cmd.env.values()]):
        raise ProfileError(f"{plan_dir / 'plan.json'}: a value in it holds a NUL byte")
    return cmd


def _script_file(script: Path | None) -> Path:
    """MiniCPM-o's finetune.py, absolute, checked to be a readable regular file."""
    if script is None:
        raise ProfileError("--target minicpm needs --script PATH (MiniCPM-o's finetune/finetune.py)")
    try:
        if not os.path.lexists(script):
            raise ProfileError(f"--script {script}: no such file")
        if not script.is_file():
            raise ProfileError(f"--script {script}: not a regular file (MiniCPM-o's finetune/finetune.py)")
        with open(script, "rb"):
            pass
    except OSError as exc:
        raise ProfileError(f"--script {script}: cannot read: {exc.strerror or exc}") from None
    return Path(os.path.abspath(script))


def readiness(plan_dir: Path, plan: Plan, target: Target, cmd: Command, hostfile: Path | None = None,
              data: str | None = None) -> list[str]:
    """What would stop the run before it trains, each as one line for the user; empty when
    nothing does. Checked on this machine: the launcher, the folder the command runs in, the
    hostfile against the plan, the data where the target reads it, and the attempts record.
    """
    problems: list[str | None] = []
    if shutil.which(cmd.argv[0], path=(os.environ | cmd.env).get("PATH")) is None:
        what = "torch" if cmd.argv[0] == "torchrun" else "deepspeed" if cmd.argv[0] == "deepspeed" else "LLaMA-Factory"
        problems.append(f"{cmd.argv[0]}: not found on PATH (install {what})")
    if not cmd.cwd.is_dir():
        problems.append(f"{cmd.cwd}: the folder the trainer runs in does not exist")
    hf = hostfile_path(Path(os.path.abspath(plan_dir)), plan, target, hostfile)
    if hf is not None:
        problems.append(hostfile_problem(plan, hf))
    problems += [data_problem(plan_dir, plan, target, cmd, data), record_problem(plan_dir)]
    return [p for p in problems if p]


def _read_small(path: Path, what: str) -> str:
    """A small text file's content.

    Raises:
        ProfileError: missing, not a regular file, unreadable, too large, or not UTF-8 text.
    """
    try:
        if not os.path.lexists(path):
            raise ProfileError(f"{what} {path}: does not exist")
        if not path.is_file():
            raise ProfileError(f"{what} {path}: not a regular file")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SMALL_FILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_SMALL_FILE_BYTES:
        raise ProfileError(f"{what} {path}: larger than {MAX_SMALL_FILE_BYTES // 2**20} MiB, not a {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProfileError(f"{what} {path}: not UTF-8 text") from None


def parse_hostfile(text: str, path: Path | str = "hostfile") -> dict[str, int]:
    """Host -> slots, read as DeepSpeed's launcher reads a hostfile (`HOSTFILE_ENTRY`).

    Raises:
        ProfileError: a line DeepSpeed refuses, a host listed twice, or no host at all.
    """
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = HOSTFILE_ENTRY.search(line)
        if m is None:
            raise ProfileError(f"hostfile {path}: line {number} {line[:80]!r} is not 'HOST slots=N' "
                               "(DeepSpeed's hostfile format)")
        if m.group(1) in hosts:
            raise ProfileError(f"hostfile {path}: host {m.group(1)!r} is listed twice (DeepSpeed refuses that)")
        try:
            hosts[m.group(1)] = int(m.group(2))
        except ValueError:
            raise ProfileError(f"hostfile {path}: line {number}: slots={m.group(2)[:20]}... is no GPU count") from None
    if not hosts:
        raise ProfileError(f"hostfile {path}: lists no host (one line per node: 'HOST slots=N')")
    return hosts


def hostfile_problem(plan: Plan, path: Path) -> str | None:
    """Why the hostfile at ``path`` cannot start this plan, or None: it must parse as DeepSpeed's
    launcher parses it, list exactly the plan's nodes with one slot per GPU of a node, and not be
    the template memplan writes (placeholder names under its comment line)."""
    c = plan.cluster
    if not os.path.lexists(path):
        return (f"the plan is for {c.nodes} nodes ({c.gpus}): no hostfile at {path} (write one, a line "
                f"'HOST slots={c.gpus_per_node}' per node, or pass --hostfile PATH)")
    try:
        text = _read_small(path, "hostfile")
        hosts = parse_hostfile(text, path)
    except ProfileError as exc:
        return str(exc)
    template = hostfile_template(plan)
    comments = {line.strip() for line in template.splitlines() if line.strip().startswith("#")}
    placeholders = [h for h in parse_hostfile(template) if h in hosts]
    if placeholders and comments & {line.strip() for line in text.splitlines()}:
        return (f"hostfile {path} is memplan's unedited template (placeholder host {', '.join(placeholders)}): put "
                "your nodes' ssh names in it (nodes really named so: delete its '#' comment line)")
    if len(hosts) != c.nodes:
        return f"hostfile {path} lists {len(hosts)} host(s); the plan is for {c.nodes} nodes ({c.gpus})"
    wrong = [f"{h} slots={n}" for h, n in hosts.items() if n != c.gpus_per_node]
    if wrong:
        return f"hostfile {path}: {wrong[0]}, but the plan has {c.gpus_per_node} GPUs per node ({c.gpus})"
    return None


def data_problem(plan_dir: Path, plan: Plan, target: Target, cmd: Command, data: str | None = None) -> str | None:
    """Why the trainer would not find its data, or None. The built-in trainer and MiniCPM's
    finetune.py read one JSON/JSONL file, relative to the folder they run in; LLaMA-Factory reads
    ``dataset_dir/dataset_info.json`` (relative to the plan folder) and the files it registers."""
    given = os.path.abspath(os.path.expanduser(data)) if data is not None else None
    if target is Target.LLAMAFACTORY:
        return _llamafactory_data_problem(plan_dir, given)
    raw = given or plan.trainer.data_path
    path = Path(os.path.expanduser(raw))
    where = "" if path.is_absolute() else f" (relative to {cmd.cwd}, where the trainer runs)"
    full = cmd.cwd / path
    hint = "" if given else "; pass --data PATH (or plan with memplan tune --data)"
    try:
        if not full.exists():
            return f"data file {raw}{where} does not exist{hint}"
        if not full.is_file():
            return f"data file {raw}{where}: not a regular file (the trainer reads one JSON/JSONL file){hint}"
        with open(full, "rb"):
            pass
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the plan's data_path
        return f"data file {raw!r}{where}: cannot read: {getattr(exc, 'strerror', None) or exc}"
    return None


def _llamafactory_data_problem(plan_dir: Path, data: str | None) -> str | None:
    if data is not None:
        folder, names = Path(data).parent, [Path(data).stem]
    else:
        import yaml

        try:
            doc = yaml.safe_load(_read_small(plan_dir / "llamafactory.yaml", "LLaMA-Factory config"))
        except ProfileError as exc:
            return str(exc)
        except (yaml.YAMLError, RecursionError):
            return f"{plan_dir / 'llamafactory.yaml'}: not valid YAML"
        if not isinstance(doc, dict):
            return f"{plan_dir / 'llamafactory.yaml'}: not a LLaMA-Factory config (a mapping of keys)"
        if not doc.get("dataset"):
            return f"{plan_dir / 'llamafactory.yaml'}: names no dataset"
        folder = Path(str(doc.get("dataset_dir", "data")))  # LLaMA-Factory's default dataset_dir
        names = [n.strip() for n in str(doc["dataset"]).split(",") if n.strip()]
    if str(folder) == "ONLINE":  # LLaMA-Factory's name for hub datasets: nothing here to check
        return None
    info_path = folder if folder.is_absolute() else Path(os.path.abspath(plan_dir)) / folder
    info_path = info_path / "dataset_info.json"
    try:
        info = json.loads(_read_small(info_path, "dataset_info.json"))
    except ProfileError as exc:
        return f"{exc} (LLaMA-Factory finds its datasets there; see the comment in llamafactory.yaml)"
    except (ValueError, RecursionError):
        return f"dataset_info.json {info_path}: not valid JSON"
    if not isinstance(info, dict):
        return f"dataset_info.json {info_path}: not a JSON object of datasets"
    for name in names:
        entry = info.get(name)
        if entry is None:
            return f"dataset {name!r} is not registered in {info_path} (see the comment in llamafactory.yaml)"
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
            local = info_path.parent / entry["file_name"]
            try:
                if not local.exists():
                    return f"dataset {name!r}: {local} does not exist (registered in {info_path})"
            except (OSError, ValueError):
                return f"dataset {name!r}: cannot read {local}"
    return None


def record_problem(plan_dir: Path) -> str | None:
    """Why no attempt can be recorded under ``PLAN_DIR/attempts``, or None (checked, not written)."""
    root = plan_dir / "attempts"
    try:
        if os.path.lexists(root) and not root.is_dir():
            return f"{root} is not a folder: move it away (memplan launch records each attempt there)"
        writable = root if root.is_dir() else plan_dir
        if not os.access(writable, os.W_OK | os.X_OK):
            return f"{writable}: not writable (memplan launch records each attempt under {root})"
    except OSError as exc:
        return f"{root}: cannot check: {exc.strerror or exc}"
    return None


@dataclass
class Attempt:
    """One run of the plan, as recorded in ``attempts/NN/result.json``."""

    number: int
    candidate: str
    returncode: int = 0
    failure: str | None = None
    seconds: float = 0.0
    started: str = ""
    reported: dict[str, str] = field(default_factory=dict)
    """What the run printed on its ``memplan-train:`` line (peak memory, steps, loss)."""
    changed: str | None = None
    """What the next attempt changes, and why."""
    stopped: str | None = None
    """Why no attempt follows a failed one: no retries left, no safer plan, or why re-planning
    or starting the next attempt failed."""


def run_streaming(cmd: Command, log: Path, echo: Callable[[str], None]) -> tuple[int, str]:
    """Run ``cmd``, passing its output through line by line and into ``log``; return the exit
    status and the last lines of output.

    Raises:
        ProfileError: the program cannot be started (not found, not executable).
    """
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    env = os.environ | cmd.env
    try:
        fh = open(log, "w", encoding="utf-8")  # noqa: SIM115  (closed by the with below)
    except OSError as exc:
        raise ProfileError(f"{log}: cannot write: {exc.strerror or exc}") from None
    with fh:
        try:
            proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", bufsize=1)
        except FileNotFoundError as exc:
            missing = cmd.argv[0] if exc.filename in (None, cmd.argv[0]) else exc.filename
            raise ProfileError(f"{missing}: not found" + (" on PATH" if missing == cmd.argv[0] else "")) from None
        except OSError as exc:
            raise ProfileError(f"{cmd.argv[0]}: cannot start: {exc.strerror or exc}") from None
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                fh.write(line)
                tail.append(line)
                echo(line.rstrip("\n"))
            returncode = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
    return returncode, "".join(tail)


def _new_record(plan_dir: Path, cmd: Command) -> Path:
    """``PLAN_DIR/attempts/NN/`` with the configs the attempt runs with and its command.

    Raises:
        ProfileError: the record cannot be written (the folder is read-only, ``attempts`` is a
            file, the disk is full).
    """
    problem = record_problem(plan_dir)
    if problem:
        raise ProfileError(problem)
    root = plan_dir / "attempts"
    try:
        root.mkdir(exist_ok=True)
        taken = [int(n) for n in os.listdir(root) if n.isascii() and n.isdigit()]
        for number in itertools.count(max(taken, default=0) + 1):
            record = root / f"{number:02d}"
            try:
                record.mkdir()
                break
            except FileExistsError:  # another launch took it meanwhile
                continue
        for name in FILES:
            if (plan_dir / name).is_file():
                shutil.copy2(plan_dir / name, record / name)
        (record / "command.json").write_text(json.dumps(cmd.as_json(), indent=2) + "\n")
    except OSError as exc:
        raise ProfileError(f"{root}: cannot record the attempt: {exc.strerror or exc}") from None
    return record


def _write_result(record: Path, attempt: Attempt, echo: Callable[[str], None]) -> None:
    try:
        (record / "result.json").write_text(json.dumps(attempt.__dict__, indent=2) + "\n")
    except OSError as exc:  # the run's exit status still decides; say the record is short
        echo(f"memplan: cannot write {record / 'result.json'}: {exc.strerror or exc}")


def _start(plan_dir: Path, target: Target, script: Path | None, hostfile: Path | None, data: str | None,
           extra: Sequence[str]) -> tuple[Plan, Command, Path]:
    """The plan, its command and its new record, everything checked; nothing runs yet.

    Raises:
        ProfileError: the first thing that would stop the run.
    """
    plan = read_plan(plan_dir)
    cmd = command(plan_dir, plan, target, script, hostfile, data, extra)
    problems = readiness(plan_dir, plan, target, cmd, hostfile, data)
    if problems:
        raise ProfileError(problems[0])
    return plan, cmd, _new_record(plan_dir, cmd)


def _rewrite(plan: Plan, plan_dir: Path) -> None:
    """Write the next plan over the folder's configs, keeping the user's hostfile (edited from the
    template, it is the user's file, which the writer rightly refuses to replace)."""
    from planner.writers import write_plan_folder

    kept, aside = plan_dir / "hostfile", plan_dir / ".hostfile.memplan-kept"
    moved = False
    try:
        if kept.is_file() and not kept.is_symlink():
            os.replace(kept, aside)
            moved = True
        write_plan_folder(plan, plan_dir, force=True)
    except OSError as exc:
        raise ProfileError(f"{plan_dir}: cannot write the next plan: {exc.strerror or exc}") from None
    finally:
        if moved:
            os.replace(aside, kept)


def launch(plan_dir: Path, target: Target, *, script: Path | None = None, hostfile: Path | None = None,
           data: str | None = None, extra: Sequence[str] = (), max_retries: int = 2,
           step_down: Callable[[Plan, Failure], tuple[Plan, str] | None] | None = None,
           echo: Callable[[str], None] = print) -> list[Attempt]:
    """Run the plan in ``plan_dir``; after an out-of-memory failure write the next safer plan
    over the folder's configs (the old ones are kept with their attempt) and run again, at most
    ``max_retries`` times. Checkpoints in the trainer's output folder are never touched. Every
    attempt that started gets its ``result.json``, also when re-planning fails.

    Args:
        plan_dir: a folder written by `memplan tune`.
        target: the trainer.
        script, hostfile, data, extra: see `command`.
        max_retries: relaunches after out-of-memory failures.
        step_down: the next plan after a failure and what it changes, or None when there is no
            safer plan (default: `recovery.step_down`).
        echo: where the run's output and memplan's messages go.

    Returns:
        Every attempt, the last one deciding the exit status.

    Raises:
        ProfileError: the first attempt cannot start (see `readiness`); nothing was run.
    """
    if step_down is None:
        from planner.launch.recovery import step_down
    attempts: list[Attempt] = []
    record: Path | None = None
    while True:
        try:
            plan, cmd, next_record = _start(plan_dir, target, script, hostfile, data, extra)
        except ProfileError as exc:
            if record is None:
                raise
            attempts[-1].stopped = f"attempt {attempts[-1].number + 1} could not start: {exc}"
            echo(f"memplan: {attempts[-1].stopped}")
            _write_result(record, attempts[-1], echo)
            return attempts
        record = next_record
        attempt = Attempt(number=int(record.name), candidate=plan.candidate,
                          started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        attempts.append(attempt)
        echo(f"memplan: attempt {attempt.number}: {plan.candidate}")
        begun = time.perf_counter()
        try:
            returncode, tail = run_streaming(cmd, record / "output.log", echo)
        except (KeyboardInterrupt, ProfileError, OSError) as exc:  # recorded, then passed on
            interrupted = isinstance(exc, KeyboardInterrupt)
            attempt.seconds = round(time.perf_counter() - begun, 3)
            attempt.returncode = INTERRUPTED if interrupted else 127
            attempt.failure = (Failure.INTERRUPTED if interrupted else Failure.OTHER).value
            attempt.stopped = "interrupted" if interrupted else f"could not run: {exc}"
            _write_result(record, attempt, echo)
            if isinstance(exc, OSError):  # writing output.log (a full disk)
                raise ProfileError(f"{record / 'output.log'}: {exc.strerror or exc}") from None
            raise
        attempt.seconds = round(time.perf_counter() - begun, 3)
        attempt.returncode = returncode
        failure = classify(returncode, tail)
        attempt.failure = failure.value if failure else None
        for line in tail.splitlines():
            m = PEAK_RE.search(line)
            if m:
                attempt.reported = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        _after(plan, plan_dir, attempt, failure, len(attempts) <= max_retries, step_down, echo)
        _write_result(record, attempt, echo)
        if attempt.changed is None:
            return attempts


def _after(plan: Plan, plan_dir: Path, attempt: Attempt, failure: Failure | None, retry_left: bool,
           step_down: Callable[[Plan, Failure], tuple[Plan, str] | None], echo: Callable[[str], None]) -> None:
    """After an attempt: for an out-of-memory failure, write the next plan and set ``changed``;
    otherwise (or when there is none) set ``stopped`` and say why."""
    if failure not in (Failure.GPU_OOM, Failure.HOST_OOM):
        return
    where = "GPU memory" if failure is Failure.GPU_OOM else "host RAM"
    if not retry_left:
        attempt.stopped = "no retries left (--max-retries)"
    else:
        try:
            nxt = step_down(plan, failure)
            if nxt is None:
                attempt.stopped = "no safer plan fits"
            else:
                _rewrite(nxt[0], plan_dir)
                attempt.changed = nxt[1]
        except ProfileError as exc:
            attempt.stopped = f"re-planning failed: {exc}"
    if attempt.changed:
        echo(f"memplan: attempt {attempt.number} ran out of {where}; next: {attempt.changed}")
    else:
        echo(f"memplan: attempt {attempt.number} ran out of {where}; {attempt.stopped}")


def exit_status(attempts: Sequence[Attempt]) -> int:
    """The exit status to return: the last attempt's (128 + signal for a killed run)."""
    code = attempts[-1].returncode if attempts else 1
    return 128 - code if code < 0 else code


def dry_run(cmd: Command, echo: Callable[[str], None] = print) -> None:
    """Print the exact command: where it runs, what it adds to the environment, its argv."""
    echo(f"cwd: {cmd.cwd}")
    for k, v in cmd.env.items():
        echo(f"env: {k}={v}")
    echo(f"argv: {json.dumps(cmd.argv)}")
