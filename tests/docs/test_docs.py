"""Every command the README and docs/ tell a reader to run works as printed (issue 26).

One test per page that has console blocks: the page runs from top to bottom in a fresh
work and data directory (tests/docs/runner.py says how blocks are marked and checked).
The last tests show the runner catching a page that no longer works, naming file and line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs import runner

RUN_PAGES = [p for p in runner.pages() if any(b.runs for b in runner.blocks(p))]


def test_the_runnable_pages_are_the_expected_ones() -> None:
    # A page losing its console blocks (or its markers) must be a decision, not an accident.
    names = {str(p.relative_to(runner.ROOT)) for p in RUN_PAGES}
    assert {
        "README.md",
        "docs/tools/creating-tools.md",
        "docs/clients.md",
        "docs/coordinator.md",
    } <= names


def test_every_skipped_block_says_why() -> None:
    for page in runner.pages():
        for block in runner.blocks(page):
            if block.lang == "console" and block.marker.startswith("skip"):
                reason = block.marker.partition(":")[2].strip()
                assert reason, f"{block.where}: a skipped block names its reason"
            if block.marker and block.marker.split()[0] not in (
                "skip:",
                "file",
                "background",
                "in-repo",
                "needs:",
            ):
                pytest.fail(f"{block.where}: unknown doc-test marker {block.marker!r}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "page", RUN_PAGES, ids=[str(p.relative_to(runner.ROOT)) for p in RUN_PAGES]
)
async def test_page_works_as_printed(page: Path, tmp_path: Path) -> None:
    assert await runner.run_page(page, tmp_path) > 0


# -- the runner itself can fail -----------------------------------------------------------

BROKEN = """\
# A page

<!-- doc-test: file plan.yaml -->
```yaml
steps: []
```

```console
$ cat plan.yaml
steps: []
$ cuga --version
cuga 0.0.0-not-this-one
```
"""

FAILING_COMMAND = """\
```console
$ echo fine
fine
$ cuga runs --no-such-option
```
"""


def _page(tmp_path: Path, text: str) -> Path:
    # Under the repository root, as the runner names files relative to it.
    page = runner.ROOT / "tests" / "docs" / f".broken-{tmp_path.name}.md"
    page.write_text(text, encoding="utf-8")
    return page


async def test_a_wrong_output_line_fails_naming_file_and_line(tmp_path: Path) -> None:
    page = _page(tmp_path, BROKEN)
    try:
        with pytest.raises(runner.DocFailure) as info:
            await runner.run_page(page, tmp_path / "work")
    finally:
        page.unlink()
    message = str(info.value)
    assert f"tests/docs/{page.name}:11: `$ cuga --version` did not print" in message
    assert "cuga 0.0.0-not-this-one" in message


async def test_a_failing_command_fails_naming_file_line_and_status(tmp_path: Path) -> None:
    page = _page(tmp_path, FAILING_COMMAND)
    try:
        with pytest.raises(runner.DocFailure) as info:
            await runner.run_page(page, tmp_path / "work")
    finally:
        page.unlink()
    assert f"tests/docs/{page.name}:4: `$ cuga runs --no-such-option` exited 2" in str(info.value)


def test_continuations_and_here_documents_belong_to_their_command() -> None:
    commands = runner.parse_console(
        "$ for s in a b; do\n>   echo $s\n> done\na\nb\n"
        "$ cat <<'EOF'\nx\nEOF\nx\n$ echo a \\\n    b\na b\n",
        1,
    )
    assert [c.text for c in commands] == [
        "for s in a b; do\n  echo $s\ndone",
        "cat <<'EOF'\nx\nEOF",
        "echo a \\\n    b",
    ]
    assert [c.expected for c in commands] == [["a", "b"], ["x"], ["a b"]]
    assert (
        runner.missing_lines(["#1 … run …", "…", "#9   COMPLETE"], ["#1 x run y", "#9 COMPLETE"])
        == []
    )
    assert runner.missing_lines(["#9 COMPLETE"], ["#9 FAILED"]) == ["#9 COMPLETE"]
