"""Run the commands of a Markdown page as a reader would, and say where the page is wrong.

What runs (the page marks it; README "Keeping the docs true" is the reader's side):

* every fenced ``console`` block: each ``$ command`` runs in one bash script per block
  (``\\``-continued lines, ``> `` prompt lines and here-documents belong to their command);
  the lines under a command are its expected output: each must match a line of the
  command's output (stdout and stderr), in order, where ``…`` matches anything and runs
  of spaces match any spacing; a line that is only ``…`` stands for lines left out;
* the command must exit 0 (a page shows another status with ``; echo "exit code $?"``);
* ``<!-- doc-test: file PATH -->`` before any fenced block: the block is written to PATH
  (in the page's work directory) when the run reaches it;
* ``<!-- doc-test: background -->`` before a console block: its commands run as in another
  terminal (``cuga up``); the run goes on once each expected line has appeared, and the
  block gets Ctrl-C (SIGINT) when the page ends and must then exit 0;
* ``<!-- doc-test: in-repo -->``: the block runs in the repository root itself (``make
  demo``: should the virtualenv be out of date, ``make`` reinstalls the repository, never
  a work directory that is gone after the test);
* ``<!-- doc-test: needs: TOOL ... -->``: the block runs only where every TOOL is on PATH
  (``node``), and is skipped, saying so, elsewhere;
* ``<!-- doc-test: skip: REASON -->``: the console block is not run, for the reason given.

Each page runs in a fresh work directory that looks like the repository root to the
reader's commands (a symbolic link to each top-level entry: ``Makefile``, ``.venv``,
``clients`` ...) but has its own data directory (``CUGA_DATA_DIR=<work>/.cuga``), its own
free ports for the six services (``CUGA_ADDRESSES__*`` and the Node example's
``CUGA_COORDINATOR_ADDRESS``, so pages run side by side and never touch 50051-56), the
project's ``bin`` directory first on PATH, and ``PIP_TARGET``/``PYTHONPATH`` pointing at
``<work>/site-packages``, so a ``pip install`` on a page lands there, not in the shared
virtualenv. Shell variables and the working directory carry from one block to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cuga.shared.config import SERVICE_NAMES
from tests.support.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)\s*$")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
STATUS = re.compile(r"^@@doc-test (\d+) (\d+)@@$")
#: How long one foreground block may run, and how long a background block may take to
#: print what the page says it prints (seconds).
BLOCK_TIMEOUT_S = 180.0
#: Top-level directories a page writes into (``cuga tokens init ./deploy/cuga-auth``):
#: copied into the work directory rather than linked, so the repository stays as it was.
COPIED = ("deploy",)
BACKGROUND_TIMEOUT_S = 90.0


@dataclass
class Command:
    """One ``$`` command of a console block and the output the page shows under it."""

    line: int
    text: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    """A fenced block and what its marker says to do with it."""

    path: Path
    line: int
    lang: str
    body: str
    marker: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        """Whether the block is run here (a console block not skipped, its tools present)."""
        if self.lang != "console" or self.marker.startswith(("skip", "file")):
            return False
        return not self.missing_tools()

    def missing_tools(self) -> list[str]:
        """The tools a ``needs:`` block names that are not on PATH."""
        if not self.marker.startswith("needs:"):
            return []
        return [t for t in self.marker[6:].split() if shutil.which(t) is None]

    def commands(self) -> list[Command]:
        """The block's commands with their expected output."""
        return parse_console(self.body, self.line + 1)


class DocFailure(AssertionError):
    """A page's command did not work as printed; the message names file and line."""


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a page, with the doc-test marker right before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        marker = ""
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and (mm := MARKER.search(lines[j])):
            marker = mm.group(1)
        found.append(Block(path, start + 1, lang, "\n".join(body) + "\n", marker))
        i += 1
    return found


def parse_console(body: str, first_line: int) -> list[Command]:
    """``$`` commands (with continuations and here-documents) and their expected lines."""
    commands: list[Command] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        raw = lines[i]
        if not raw.startswith("$ "):
            if commands:
                commands[-1].expected.append(raw)
            elif raw.strip():
                raise DocFailure(f"line {first_line + i}: output before any `$ ` command")
            i += 1
            continue
        command = Command(first_line + i, raw[2:])
        i += 1
        heredoc = HEREDOC.search(command.text)
        while i < len(lines):
            if heredoc is not None:
                command.text += "\n" + lines[i]
                if lines[i].strip() == heredoc.group(1):
                    heredoc = None
                i += 1
            elif command.text.endswith("\\") or lines[i].startswith("> "):
                nxt = lines[i][2:] if lines[i].startswith("> ") else lines[i]
                command.text += "\n" + nxt
                heredoc = HEREDOC.search(nxt)
                i += 1
            else:
                break
        commands.append(command)
    return commands


def expected_pattern(line: str) -> re.Pattern[str] | None:
    """The regex a shown output line stands for; None for a line standing for any lines."""
    text = line.strip()
    if not text or text in ("…", "..."):
        return None
    parts = [re.escape(p) for p in text.split("…")]
    pattern = ".*".join(parts)
    pattern = re.sub(r"(\\ )+", r"\\s+", pattern)
    return re.compile(pattern)


def missing_lines(expected: Sequence[str], actual: Sequence[str]) -> list[str]:
    """The expected lines not found, in order, among the actual ones."""
    missing: list[str] = []
    at = 0
    for line in expected:
        pattern = expected_pattern(line)
        if pattern is None:
            continue
        for k in range(at, len(actual)):
            if pattern.fullmatch(actual[k].strip()):
                at = k + 1
                break
        else:
            missing.append(line.strip())
    return missing


def _script(commands: Sequence[Command], state: Path, *, in_repo: bool = False) -> str:
    """A bash script running ``commands`` with the page's shell state, printing a status
    line after each command and saving the state at the end (an ``in-repo`` block starts
    in the repository and leaves the page's working directory as it was)."""
    quoted = shlex.quote(str(state))
    parts = [
        "set -a",  # every variable a command sets is exported, so the next block sees it
        f"[ -f {quoted} ] && . {quoted}",
        "true" if in_repo else f'[ -f {quoted}.cwd ] && cd "$(cat {quoted}.cwd)"',
    ]
    for n, command in enumerate(commands):
        parts.append(command.text)
        parts.append(f"printf '\\n@@doc-test %d %d@@\\n' {n} $?")
    parts.append(f"export -p > {quoted}")
    if not in_repo:
        parts.append(f"pwd > {quoted}.cwd")
    return "\n".join(parts) + "\n"


def _outputs(text: str, count: int) -> tuple[list[list[str]], dict[int, int]]:
    """Each command's output lines and exit status from a script's combined output."""
    outputs: list[list[str]] = [[] for _ in range(count)]
    statuses: dict[int, int] = {}
    current = 0
    for line in text.splitlines():
        m = STATUS.match(line)
        if m:
            statuses[int(m.group(1))] = int(m.group(2))
            current = int(m.group(1)) + 1
        elif current < count:
            outputs[current].append(line)
    return outputs, statuses


def _check(block: Block, commands: Sequence[Command], text: str) -> None:
    outputs, statuses = _outputs(text, len(commands))
    for n, command in enumerate(commands):
        status = statuses.get(n)
        shown = "\n".join(outputs[n][-40:])
        if status is None:
            raise DocFailure(
                f"{block.path.relative_to(ROOT)}:{command.line}: `$ {command.text}` did not"
                f" finish\n{shown}"
            )
        if status != 0:
            raise DocFailure(
                f"{block.path.relative_to(ROOT)}:{command.line}: `$ {command.text}` exited"
                f" {status}, the page expects 0\n{shown}"
            )
        missing = missing_lines(command.expected, outputs[n])
        if missing:
            raise DocFailure(
                f"{block.path.relative_to(ROOT)}:{command.line}: `$ {command.text}` did not"
                f" print {missing[0]!r} (the page shows it)\n--- its output:\n{shown}"
            )


@dataclass
class Background:
    """A block running as in another terminal."""

    block: Block
    proc: asyncio.subprocess.Process
    lines: list[str]
    reader: asyncio.Task[None]


class PageRun:
    """One page's run: its work directory, environment and background blocks."""

    def __init__(self, page: Path, work: Path) -> None:
        self.page = page
        self.work = work
        self.state = work / ".doc-test-state"
        site = work / "site-packages"
        site.mkdir(parents=True, exist_ok=True)
        for entry in ROOT.iterdir():
            if entry.name in (".cuga", ".git", "site-packages") or entry.name.startswith(
                ".doc-test"
            ):
                continue
            if entry.name in COPIED:
                shutil.copytree(entry, work / entry.name, symlinks=True)
            else:
                (work / entry.name).symlink_to(entry)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CUGA_", "OTEL_"))}
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTEST_XDIST_WORKER", None)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        env["CUGA_DATA_DIR"] = str(work / ".cuga")
        env["PIP_TARGET"] = str(site)
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
        env["COLUMNS"] = "200"
        *ports, console_port = free_ports(len(SERVICE_NAMES) + 1)
        for name, port in zip(SERVICE_NAMES, ports, strict=True):
            env[f"CUGA_ADDRESSES__{name.upper()}"] = f"127.0.0.1:{port}"
        env["CUGA_CONSOLE_PORT"] = str(console_port)  # `cuga console`'s default port
        env["CUGA_COORDINATOR_ADDRESS"] = env["CUGA_ADDRESSES__COORDINATOR"]
        self.env = env
        self.background: list[Background] = []

    def _start_dir(self, block: Block) -> Path:
        return ROOT if block.marker == "in-repo" else self.work

    async def _spawn(self, block: Block, commands: Sequence[Command]) -> asyncio.subprocess.Process:
        script = _script(commands, self.state, in_repo=block.marker == "in-repo")
        return await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            script,
            cwd=self._start_dir(block),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches all of it
        )

    async def run_block(self, block: Block) -> None:
        """Write a file block, or run a console block and check it."""
        if block.marker.startswith("file "):
            target = self.work / block.marker[5:].strip()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.body, encoding="utf-8")
            return
        if not block.runs:
            return
        commands = block.commands()
        if not commands:
            raise DocFailure(f"{block.where}: a console block without a `$ ` command")
        proc = await self._spawn(block, commands)
        if block.marker == "background":
            await self._background(block, commands, proc)
            return
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), BLOCK_TIMEOUT_S)
        except TimeoutError:
            _signal(proc, signal.SIGKILL)
            await proc.wait()
            raise DocFailure(f"{block.where}: still running after {BLOCK_TIMEOUT_S:g}s") from None
        _check(block, commands, out.decode("utf-8", "replace"))

    async def _background(
        self, block: Block, commands: Sequence[Command], proc: asyncio.subprocess.Process
    ) -> None:
        lines: list[str] = []
        wanted = [line for c in commands for line in c.expected]
        found = asyncio.Event()
        assert proc.stdout is not None
        stdout = proc.stdout

        async def read() -> None:
            while raw := await stdout.readline():
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                if not missing_lines(wanted, lines):
                    found.set()
            found.set()  # it ended: whatever it printed is all there is

        reader = asyncio.ensure_future(read())
        self.background.append(Background(block, proc, lines, reader))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(found.wait(), BACKGROUND_TIMEOUT_S)
        missing = missing_lines(wanted, lines)
        if missing or proc.returncode is not None:
            shown = "\n".join(lines[-40:])
            what = f"did not print {missing[0]!r}" if missing else "ended early"
            raise DocFailure(f"{block.where}: the background block {what}\n{shown}")

    async def stop_background(self) -> None:
        """Ctrl-C every background block; each must end with exit status 0."""
        problems: list[str] = []
        for bg in reversed(self.background):
            if bg.proc.returncode is None:
                _signal(bg.proc, signal.SIGINT)
            try:
                await asyncio.wait_for(bg.proc.wait(), 60)
            except TimeoutError:
                _signal(bg.proc, signal.SIGKILL)
                await bg.proc.wait()
                problems.append(f"{bg.block.where}: did not stop on Ctrl-C")
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(bg.reader, 5)
            statuses = [int(m.group(2)) for line in bg.lines if (m := STATUS.match(line))]
            if any(statuses):
                problems.append(
                    f"{bg.block.where}: exited {statuses} after Ctrl-C\n"
                    + "\n".join(bg.lines[-20:])
                )
        self.background.clear()
        if problems:
            raise DocFailure("\n".join(problems))


def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@contextlib.asynccontextmanager
async def page_run(page: Path, work: Path) -> AsyncIterator[PageRun]:
    """A page's run; its background blocks are stopped when it ends."""
    run = PageRun(page, work)
    try:
        yield run
    finally:
        await run.stop_background()


async def run_page(page: Path, work: Path) -> int:
    """Run every block of a page in order; the number of console blocks run.

    Raises:
        DocFailure: the first command that does not work as printed (file and line).
    """
    count = 0
    async with page_run(page, work) as run:
        for block in blocks(page):
            await run.run_block(block)
            count += block.runs
    return count


def pages() -> Iterator[Path]:
    """README.md and every page under docs/."""
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))


__all__ = [
    "Block",
    "Command",
    "DocFailure",
    "blocks",
    "missing_lines",
    "pages",
    "parse_console",
    "run_page",
]
