"""The API reference builds, and documents every public name (issue 23, `make docs`).

The same code as ``make docs`` (scripts/gen_docs.py) builds the reference into a temporary
directory: the Python API from the docstrings (pdoc) and the gRPC contract from the proto
comments. It must find no public name without documentation, no docstring reference that
names nothing, and no link of the pages that leads nowhere. The last tests show each of
these checks failing on a small package, contract and site made to be wrong.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# scripts/ is what `python scripts/gen_docs.py` has first on its path.
sys.path.insert(0, str(ROOT / "scripts"))
apiref_grpc = importlib.import_module("apiref_grpc")
apiref_python = importlib.import_module("apiref_python")
gen_docs = importlib.import_module("gen_docs")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("reference")
    return out, gen_docs.build(out)


def test_the_reference_has_no_problem(site: tuple[Path, list[str]]) -> None:
    _, problems = site
    assert problems == [], "\n".join(problems)


def test_every_public_python_name_has_its_entry(site: tuple[Path, list[str]]) -> None:
    out, _ = site
    for name in apiref_python.PYTHON_MODULES:
        module = importlib.import_module(name)
        page = (out / "python" / f"{name.replace('.', '/')}.html").read_text(encoding="utf-8")
        for public in module.__all__:
            # pdoc gives each documented name an anchor of its own (LLMPlanner, served
            # lazily by the package's __getattr__, too).
            assert f'id="{public}"' in page, f"{name}.{public} is missing from its page"


def test_every_rpc_has_its_entry(site: tuple[Path, list[str]]) -> None:
    out, _ = site
    files = apiref_grpc.proto_descriptors()
    assert {f.package for f in files.file} == {
        p.stem.removesuffix(".html") for p in (out / "grpc").glob("cuga.*.html")
    }
    for file in files.file:
        page = (out / "grpc" / f"{file.package}.html").read_text(encoding="utf-8")
        for service in file.service:
            for rpc in service.method:
                assert f'id="{service.name}.{rpc.name}"' in page, f"{service.name}.{rpc.name}"


# -- each check can fail -------------------------------------------------------------------

BAD_PACKAGE = '''\
"""A package with gaps in its documentation."""

import enum

__all__ = ["LIMIT", "Shape", "Tool", "helper"]

#: Documented the Sphinx way.
LIMIT = 3


class Shape(enum.Enum):
    """Shapes."""

    ROUND = 1
    """Documented."""
    SQUARE = 2


class Tool:
    """Runs things; see :meth:`Tool.run`, :class:`Shape` and :class:`Missing`.

    Attributes:
        name: documented in the class's section.
    """

    name: str = ""
    size: int = 0

    def run(self) -> None:
        """Runs."""

    def stop(self) -> None:
        pass


def helper() -> None:
    pass
'''


def test_an_undocumented_name_and_a_broken_reference_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "refcheck_bad").mkdir()
    (tmp_path / "refcheck_bad" / "__init__.py").write_text(BAD_PACKAGE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "refcheck_bad", raising=False)
    modules = apiref_python.python_modules(["refcheck_bad"])
    apiref_python.adopt_comments(modules)
    assert sorted(apiref_python.undocumented(modules)) == [
        "attribute refcheck_bad.Shape.SQUARE has no docstring",
        "attribute refcheck_bad.Tool.size has no docstring",
        "function refcheck_bad.helper has no docstring",
        "method refcheck_bad.Tool.stop has no docstring",
    ]
    assert apiref_python.broken_references(modules) == [
        "refcheck_bad.Tool: :class:`Missing` names nothing documented"
    ]


BAD_PROTO = """\
// A contract with gaps in its comments.
syntax = "proto3";

package demo.v1;

// Says hello.
service GreeterService {
  // Greets.
  rpc Greet(GreetRequest) returns (GreetResponse);
  rpc Wave(GreetRequest) returns (GreetResponse);
}

// Request of Greet.
message GreetRequest {
  // Whom to greet.
  string name = 1;
  string mood = 2;  // After the field, on its line: documented too.
  int32 times = 3;
  oneof how {
    // Out loud.
    bool loud = 4;
  }
}

message GreetResponse {
  // The greeting.
  string text = 1;
}

// Moods.
enum Mood {
  // Unknown.
  MOOD_UNSPECIFIED = 0;
  MOOD_HAPPY = 1;
}
"""


def test_an_uncommented_proto_element_is_found(tmp_path: Path) -> None:
    proto = tmp_path / "demo" / "v1" / "demo.proto"
    proto.parent.mkdir(parents=True)
    proto.write_text(BAD_PROTO, encoding="utf-8")
    contract = apiref_grpc.read_contract(apiref_grpc.proto_descriptors(tmp_path))
    assert sorted(contract.problems) == [
        "enum value demo.v1.Mood.MOOD_HAPPY (demo/v1/demo.proto) has no comment",
        "field demo.v1.GreetRequest.times (demo/v1/demo.proto) has no comment",
        "message demo.v1.GreetResponse (demo/v1/demo.proto) has no comment",
        "oneof demo.v1.GreetRequest.how (demo/v1/demo.proto) has no comment",
        "rpc demo.v1.GreeterService.Wave (demo/v1/demo.proto) has no comment",
    ]
    apiref_grpc.render_protos(contract, tmp_path / "site" / "grpc")
    (tmp_path / "site" / "index.html").write_text('<a href="grpc/index.html">contract</a>')
    assert gen_docs.broken_links(tmp_path / "site") == []


def test_a_link_that_leads_nowhere_is_found(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "index.html").write_text(
        textwrap.dedent("""\
            <a href="sub/page.html#here">fine</a> <a href="#top">fine</a>
            <a href="https://example.org/x.html">another site: not checked</a>
            <a href="sub/page.html#gone">no such anchor</a> <a href="nowhere.html">no page</a>
            <h1 id="top">Top</h1>
        """),
        encoding="utf-8",
    )
    (tmp_path / "sub" / "page.html").write_text('<p id="here"><a href="../index.html">up</a>')
    assert gen_docs.broken_links(tmp_path) == [
        "index.html: link sub/page.html#gone leads nowhere",
        "index.html: link nowhere.html leads nowhere",
    ]


def test_a_directory_it_did_not_build_is_never_emptied(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an API reference"):
        gen_docs.build(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
