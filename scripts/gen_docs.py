"""Build the API reference (``make docs``) and check it (tests/docs/test_reference.py).

Two parts in one directory (``build/docs/`` unless ``--out``; never committed):

* ``python/``: the public Python API, ``cuga.orchestrator``, ``cuga.tools`` and the client
  library ``cuga.client`` with its public submodules, rendered from the docstrings by pdoc;
* ``grpc/``: the gRPC contract, one page per package of ``protos/``, rendered from the proto
  comments: ``grpc_tools.protoc --include_source_info`` writes the descriptors with their
  comments, and scripts/apiref_grpc.py turns them into HTML (docs/reference.md says why no
  ready-made generator is used).

The build fails (exit 1, each problem on a line) on a public name without documentation
(module, class, function, method, attribute, enum member; package, service, RPC, message,
field, oneof, enum, enum value), on a docstring cross-reference (``:class:`X```,
``:meth:`X.y``` ...) that names nothing in the reference, and on a link of the built pages
that leads nowhere.
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

from apiref_grpc import PROTOS, proto_descriptors, read_contract, render_protos, write_page
from apiref_python import (
    PYTHON_MODULES,
    adopt_comments,
    broken_references,
    prepare_pages,
    python_modules,
    render_python,
    undocumented,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "docs"
TITLE = "cuga API reference"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)
            elif name == "href" and tag == "a" and value:
                self.hrefs.append(value)


def broken_links(out: Path) -> list[str]:
    """Each link of a built page to a page or an anchor that is not there."""
    pages: dict[Path, _Links] = {}
    for page in sorted(out.rglob("*.html")):
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        pages[page.resolve()] = parser
    problems = []
    for page, parser in pages.items():
        for href in parser.hrefs:
            if re.match(r"^[a-z][a-z0-9+.-]*:|^//", href):
                continue  # another site: not ours to check offline
            target, _, anchor = href.partition("#")
            target_page = (page.parent / target).resolve() if target else page
            if target_page.is_dir():
                target_page = target_page / "index.html"
            found = pages.get(target_page)
            if found is None or (anchor and anchor not in found.ids):
                problems.append(f"{page.relative_to(out.resolve())}: link {href} leads nowhere")
    return problems


def build(
    out: Path = OUT, *, protos: Path = PROTOS, modules: Sequence[str] = PYTHON_MODULES
) -> list[str]:
    """Build the reference into ``out``; return every problem found.

    ``out`` is emptied first when it holds a reference built before; any other directory
    that is not empty is refused rather than emptied.
    """
    if out.exists() and any(out.iterdir()):
        index = out / "index.html"
        if not index.is_file() or TITLE not in index.read_text(encoding="utf-8"):
            raise SystemExit(f"{out}: not empty and not an API reference; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    contract = read_contract(proto_descriptors(protos))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = python_modules(modules)
        adopt_comments(docs)
        problems = [*undocumented(docs), *broken_references(docs), *contract.problems]
        prepare_pages(docs, contract.comments)
        render_python(docs, out / "python")
    problems += [f"pdoc: {w.message}" for w in caught if "pdoc" in str(w.filename)]
    render_protos(contract, out / "grpc")
    write_page(
        out / "index.html",
        TITLE,
        [
            f"<h1>{TITLE}</h1><ul>",
            '<li><a href="python/index.html">Python API</a>: ',
            ", ".join(f"<code>{html.escape(m)}</code>" for m in docs),
            '</li><li><a href="grpc/index.html">gRPC contract</a>: ',
            ", ".join(f"<code>{html.escape(p)}</code>" for p in sorted(contract.packages)),
            "</li></ul>",
        ],
    )
    return problems + broken_links(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="where to build (build/docs)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    problems = build(args.out)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problems in the API reference", file=sys.stderr)
        return 1
    print(f"API reference: {args.out / 'index.html'} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
