"""The docs stay true: every ```bash, ```yaml and ```python block of README.md and
docs/*.md is checked, and the generated references (docs/cli.md, docs/configuration.md)
are up to date.

Markers: an HTML comment on the line right before a fence (invisible when rendered)
says how far a ```bash block is checked. Every block, whatever its marker, has each
``cvserve ...`` command (also after ``&&``, ``;`` or ``|``, and ``python -m cvserve``)
parsed by the CLI's own parser, and passes ``bash -n``.

- no marker: that is all (pages this test does not know are checked this far);
- ``<!-- doc: run -->``: the block also runs, offline, as one bash script (``set -e``)
  in a fresh folder holding ``photo.jpg`` and ``receipt.jpg``, with ``cvserve`` meaning
  this tree and a model store holding ``tiny-resnet``; it must exit 0 within 120 s;
- ``<!-- doc: server NAME=MODEL ... -->``: as ``run``, against a server this test starts
  serving each MODEL under NAME (``127.0.0.1:8000`` in the block becomes its address;
  ``cvserve serve`` lines are only parsed, the test's server stands in for them);
- ``<!-- doc: parse-only: REASON -->``: only parsed, and REASON says why (it serves
  until stopped, needs a GPU, a cluster, minutes ...); a reason is required.

Every ``cvserve serve`` command given by flags also builds its server config, so its
values pass the checks start-up would make.

```yaml blocks load with ``cvserve.config.load_config`` unless marked
``<!-- doc: not-config: REASON -->``; ```python blocks compile.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: A fenced block (indented too, as inside a list item), with the marker line before it.
FENCE = re.compile(
    r"^(?:[ \t]*<!--\s*doc:\s*(.*?)\s*-->\n)?[ \t]*```(\w+)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S
)
MARKERS = ("run", "server", "parse-only", "not-config")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    marker: str  # "" when none
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def kind(self) -> str:
        return self.marker.split(":")[0].split()[0] if self.marker else ""


def _blocks() -> list[Block]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start(2 if m.group(1) is None else 1)) + 1
            out.append(Block(str(page.relative_to(REPO)), line, m.group(2), m.group(1) or "",
                             textwrap.dedent(m.group(3))))  # fmt: skip
    return out


BLOCKS = _blocks()


def _by_lang(*langs: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang in langs]


def cvserve_commands(script: str) -> list[list[str]]:
    """The ``cvserve`` command lines of a shell script, as argument lists (after
    ``cvserve``), continuation lines joined, comments dropped, split at ``&& ; | &``."""
    script = script.replace("\\\n", " ")
    commands = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        segment: list[str] = []
        try:
            tokens = [*lex, ";"]
        except ValueError:  # a line of a multi-line quoted string (python -c "..."): no command
            continue
        for token in tokens:
            if token and set(token) <= set("&|;"):
                if segment[:1] == ["cvserve"]:
                    commands.append(segment[1:])
                elif segment[:3] == ["python", "-m", "cvserve"]:
                    commands.append(segment[3:])
                segment = []
            else:
                segment.append(token)
    return commands


def _parse(argv: list[str]) -> None:
    from cvserve.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's error (2), or --help (0)
        if e.code:
            pytest.fail(f"cvserve {shlex.join(argv)}: does not parse (exit {e.code})")


BASH = _by_lang("bash", "sh", "shell")
COMMANDS = [(b, argv) for b in BASH for argv in cvserve_commands(b.text)]


def test_markers_are_known_and_explained():
    for b in BLOCKS:
        if not b.marker:
            continue
        assert b.kind in MARKERS, f"{b.id}: unknown marker {b.marker!r}; use one of {MARKERS}"
        if b.kind in ("parse-only", "not-config"):
            reason = b.marker.split(":", 1)[1].strip() if ":" in b.marker else ""
            assert reason, f"{b.id}: {b.kind} needs a reason: <!-- doc: {b.kind}: WHY -->"
        if b.kind == "server":
            pairs = b.marker.split()[1:]
            assert pairs and all("=" in p for p in pairs), f"{b.id}: server NAME=MODEL ..."


def test_commands_found():
    """The extraction works: the README's own commands are among those checked."""
    found = {shlex.join(argv) for b, argv in COMMANDS if b.page == "README.md"}
    assert "serve --model resnet18 --port 8000" in found
    assert len(COMMANDS) >= 30, len(COMMANDS)


@pytest.mark.parametrize(
    ("block", "argv"), COMMANDS, ids=[f"{b.id}:{argv[0] if argv else ''}" for b, argv in COMMANDS]
)
def test_command_parses(block, argv):
    _parse(argv)


def _serve_commands() -> list[tuple[Block, list[str]]]:
    """``cvserve serve`` commands that name what to serve with flags (not --config), but
    for one that uses a file an earlier command of its block writes (``--out FILE``)."""
    out = []
    for b in BASH:
        made: set[str] = set()
        for argv in cvserve_commands(b.text):
            if argv[:1] == ["serve"] and "--config" not in argv and not made & set(argv):
                out.append((b, argv))
            made |= {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"}
    return out


SERVE = _serve_commands()


@pytest.mark.parametrize(("block", "argv"), SERVE, ids=[b.id for b, _ in SERVE])
def test_serve_command_makes_a_valid_config(block, argv):
    """Beyond parsing: the flags' values pass the config's own checks (ports, profiles,
    devices, durations), as they would at start-up."""
    from cvserve.cli import build_parser
    from cvserve.config.flags import server_config_from_args

    server_config_from_args(build_parser().parse_args(argv))


@pytest.mark.parametrize("block", BASH, ids=[b.id for b in BASH])
def test_shell_syntax(block):
    r = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert r.returncode == 0, f"{block.id}: {r.stderr}"


YAML = _by_lang("yaml", "yml")


@pytest.mark.parametrize("block", YAML, ids=[b.id for b in YAML])
def test_yaml_loads(block, tmp_path):
    from cvserve.config import load_config

    if block.kind == "not-config":
        import yaml

        yaml.safe_load(block.text)
        return
    path = tmp_path / "serve.yaml"
    path.write_text(block.text)
    load_config(path)


PYTHON = _by_lang("python")


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_compiles(block):
    compile(block.text, block.id, "exec")


RUNNABLE = [b for b in BASH if b.kind in ("run", "server")]


@pytest.fixture(scope="module")
def doc_folder(tmp_path_factory, data_dir, model_cache):
    """A folder to run blocks in, and an environment where ``cvserve`` is this tree."""
    folder = tmp_path_factory.mktemp("doc-run")
    shutil.copy(data_dir / "images" / "medium" / "demo01.jpg", folder / "photo.jpg")
    shutil.copy(next((data_dir / "ocr").glob("*.jpg")), folder / "receipt.jpg")
    bin_dir = tmp_path_factory.mktemp("doc-bin")
    shim = bin_dir / "cvserve"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cvserve "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["CVSERVE_CACHE"] = str(model_cache)
    return folder, env


def _server(pairs: list[str], cache: Path):
    from cvserve.config import ModelConfig, ServerConfig
    from cvserve.serving.process import ServerThread, free_port

    models = tuple(ModelConfig(name, model=model) for name, model in (p.split("=") for p in pairs))
    return ServerThread(ServerConfig(port=free_port(), cache_dir=str(cache), models=models))


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block_runs(block, doc_folder, model_cache):
    folder, env = doc_folder
    script = block.text
    server = None
    if block.kind == "server":
        server = _server(block.marker.split()[1:], model_cache).start()
        host_port = server.url.split("://", 1)[1]
        script = script.replace("127.0.0.1:8000", host_port)
        lines = script.replace("\\\n", " ").splitlines()
        script = "\n".join(ln for ln in lines if not ln.lstrip().startswith("cvserve serve"))
    try:
        r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=folder, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        if server is not None:
            server.stop()
    assert r.returncode == 0, (
        f"{block.id} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    )


def test_generated_references_up_to_date(tmp_path):
    from cvserve.cli import docs

    for name, make in docs.GENERATED.items():
        committed = (REPO / "docs" / name).read_text()
        assert committed == make(), f"docs/{name} is out of date: run python -m cvserve.cli.docs"


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in re.findall(r"\]\((docs/[\w.-]+\.md)", readme):
        assert (REPO / page).exists(), page


def test_numbers_name_their_machine():
    """'here' and 'this machine' never stand for a machine the reader cannot see."""
    for page in PAGES:
        if page.name == "cli.md":  # --help texts: "this machine" is the reader's own
            continue
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for phrase in ("this machine", "on this 2-core machine", "measured here", " here (2"):
            assert phrase not in text.lower(), (page, phrase)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


#: Pages other helpers write; a link to one may land before the page does.


def test_links_between_pages_resolve():
    anchors = {}
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        anchors[page.resolve()] = {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)(?:#([\w-]+))?\)", text):
            dest = (page.parent / target).resolve() if target else page.resolve()
            assert dest.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                assert anchor in anchors.get(dest, set()), f"{page.name}: no #{anchor} in {target}"
