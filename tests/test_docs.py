"""What README.md and docs/ tell a reader to type or copy exists and passes the gate: config
snippets, `make`, `specdec` and `snakemake` commands, links and named sections (the
conventions: docs/development.md, "Documentation")."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from specdec import cli
from specdec.gate.config import expand_matrix, load_config, read_yaml, schema_path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
# Where a command starts inside a line: its beginning, or after a shell separator.
SEPARATORS = {";", "&&", "||", "|", "do", "then"}


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def _blocks(*infos: str) -> list[tuple[str, str]]:
    """(page, text) of every fenced block whose info string is one of `infos`."""
    return [
        (_name(page), match[2])
        for page in PAGES
        for match in FENCE.finditer(page.read_text())
        if match[1].strip() in infos
    ]


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _commands() -> list[tuple[str, list[str]]]:
    """(page, words) of each shell line of a `bash` block and of each inline code span."""
    texts = [(page, line) for page, block in _blocks("bash") for line in block.replace("\\\n", " ").splitlines()]
    texts += [(_name(page), span) for page in PAGES for span in re.findall(r"`([^`\n]+)`", _prose(page.read_text()))]
    commands = []
    for page, text in texts:
        try:
            words = shlex.split(text, comments=True)
        except ValueError:  # a span that is prose with an apostrophe, not a command
            words = text.split()
        start = 0
        for i, word in enumerate([*words, ";"]):
            if word.rstrip(";") != word or word in SEPARATORS:
                commands.append((page, [w.rstrip(";") for w in words[start : i + 1] if w not in SEPARATORS]))
                start = i + 1
    return [(page, words) for page, words in commands if words]


def _program(words: list[str], name: str) -> list[str] | None:
    """The arguments of `words` when it runs `name` (by path or bare, after VAR=value), else None."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if words and Path(words[0]).name == name:
        return words[1:]
    return None


def _invocations(name: str) -> list[tuple[str, list[str]]]:
    return [(page, args) for page, words in _commands() if (args := _program(words, name)) is not None]


@pytest.fixture(autouse=True)
def _readers_files(monkeypatch):
    """Snippets name the reader's own dataset files and model folders, which are not here:
    the gate's file checks (`config.check_inputs`, tested in test_gate) are left out."""
    monkeypatch.setattr(cli, "check_inputs", lambda config: None)


def _gate(config_text: str, tmp_path: Path) -> tuple[int, str]:
    """`specdec check-config` on the text, written to a file: its exit status and the file."""
    path = tmp_path / "snippet.yaml"
    path.write_text(config_text)
    return cli.main(["check-config", "--config", str(path)]), str(path)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _headings(page: Path) -> list[str]:
    return [m[1].strip() for m in re.finditer(r"^#{1,6} (.+)$", _prose(page.read_text()), re.M)]


CONFIGS = _blocks("yaml")
FRAGMENTS = _blocks("yaml fragment")
SHIPPED = yaml.safe_load((REPO / "config.yaml").read_text())
SHIPPED_CELLS = {cell.id for cell in expand_matrix(load_config(REPO / "config.yaml"))}


def test_the_readme_is_short_and_keeps_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    two = readme.split("\n## The two commands\n", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("#")[0].strip() for line in FENCE.search(two)[2].splitlines()]
    assert lines == ["make run", "make test"]


def test_the_pages_hold_configs_fragments_and_commands():
    """The checks below see something: a renamed fence would otherwise check nothing."""
    assert len(CONFIGS) >= 3 and len(FRAGMENTS) >= 1
    for program in ("make", "specdec", "snakemake"):
        assert len(_invocations(program)) >= 3, program


@pytest.mark.parametrize("page, text", CONFIGS, ids=[f"{page}:{i}" for i, (page, _) in enumerate(CONFIGS)])
def test_each_config_snippet_passes_the_gate(page, text, tmp_path, capsys):
    status, path = _gate(text, tmp_path)
    assert status == 0, f"a config in {page} fails the gate: {capsys.readouterr().err}"
    assert f"{path}: valid" in capsys.readouterr().out


@pytest.mark.parametrize("page, text", FRAGMENTS, ids=[f"{page}:{i}" for i, (page, _) in enumerate(FRAGMENTS)])
def test_each_config_fragment_passes_the_gate_on_the_shipped_config(page, text, tmp_path, capsys):
    (tmp_path / "fragment.yaml").write_text(text)
    fragment = read_yaml(tmp_path / "fragment.yaml")
    assert isinstance(fragment, dict) and set(fragment) <= set(yaml.safe_load(schema_path().read_text())["properties"])
    config = dict(SHIPPED)
    for key, value in fragment.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    status, _ = _gate(yaml.safe_dump(config), tmp_path)
    assert status == 0, f"a config fragment in {page} fails the gate on config.yaml: {capsys.readouterr().err}"


def test_a_snippet_that_breaks_the_gate_is_caught(tmp_path, capsys):
    """The gate check above can fail: a misspelt key in the README's own config."""
    text = next(text for page, text in CONFIGS if page == "README.md").replace("max_new_tokens", "max_new_token")
    status, _ = _gate(text, tmp_path)
    assert status == 2 and "max_new_token" in capsys.readouterr().err


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))


def test_each_make_target_named_exists():
    targets = _make_targets()
    assert {"run", "test"} <= targets
    for page, args in _invocations("make"):
        named = [a for a in args if "=" not in a and not a.startswith("-")]
        assert not named or named[0] in targets, f"{page}: make {named[0]} is not a Makefile target"


def test_each_specdec_subcommand_named_exists():
    subcommands = set(next(a for a in cli.build_parser()._actions if a.dest == "command").choices)
    for page, args in _invocations("specdec"):
        assert not args or args[0] in subcommands, f"{page}: specdec {' '.join(args[:1])} is not a subcommand"


def _option_values(args: list[str], option: str) -> list[str]:
    """The words after `option` up to the next option."""
    values, taking = [], False
    for arg in args:
        if arg.startswith("-"):
            taking = arg == option
        elif taking:
            values.append(arg)
    return values


def _rules() -> set[str]:
    sources = [REPO / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")]
    return {name for path in sources for name in re.findall(r"^rule (\w+):", path.read_text(), re.M)}


def test_each_snakemake_command_names_existing_experiments_profiles_rules_and_cells():
    experiments, rules = set(SHIPPED["experiments"]), _rules()
    for page, args in _invocations("snakemake"):
        for value in _option_values(args, "--config"):
            if value.startswith("run="):
                named = set(value.removeprefix("run=").strip("[]").split(","))
                assert named <= experiments, f"{page}: snakemake --config {value}: no such experiment"
        for option in ("--workflow-profile", "--profile"):
            for profile in _option_values(args, option):
                assert (REPO / profile / "config.yaml").is_file(), f"{page}: {option} {profile}: no such profile"
        for rule in _option_values(args, "--allowed-rules"):
            assert rule in rules, f"{page}: --allowed-rules {rule}: no such rule"


def test_each_cell_and_script_a_command_names_exists():
    for page, words in _commands():
        for word in words:
            parts = word.split("/")
            if word.startswith("results/runs/") and len(parts) > 3 and not re.search(r"[<>{}$]", word):
                assert f"{parts[2]}/{parts[3]}" in SHIPPED_CELLS, f"{page}: {word} is no cell of config.yaml"
            if re.fullmatch(r"bench/[\w/.-]+\.py", word):
                assert (REPO / word).is_file(), f"{page}: {word} does not exist"
        if (args := _program(words, "specdec")) and "config.yaml" in _option_values(args, "--config"):
            for cell_id in _option_values(args, "--cell-id"):
                assert cell_id in SHIPPED_CELLS, f"{page}: --cell-id {cell_id} is no cell of config.yaml"


def test_each_relative_link_and_anchor_exists():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{_name(page)}: link to {target}: no such file"
            if anchor:
                assert anchor in {_slug(h) for h in _headings(linked)}, f"{_name(page)}: link to {target}: no such heading"


def test_each_docs_section_named_in_code_exists():
    """Comments, captions and messages name `docs/PAGE.md, "Heading"`: the page and heading exist."""
    sources = [REPO / "config.yaml", REPO / "Makefile", *PAGES]
    for folder in ("src", "workflow", "tests", "bench"):
        sources += [p for p in (REPO / folder).rglob("*") if p.suffix in {".py", ".smk", ".rst", ".yaml", ".json"}]
    for source in sources:
        text = source.read_text()
        for page, heading in re.findall(r"\b(docs/[a-z][a-z0-9_-]*\.md|README)(?:\.md)?,?\s+\"([^\"\n]+)\"", text):
            assert heading in _headings(REPO / (page if page != "README" else "README.md")), f"{_name(source)}: {page}, {heading!r}: no such heading"
        for page in re.findall(r"\bdocs/[a-z][a-z0-9_-]*\.md\b", text):
            assert (REPO / page).is_file(), f"{_name(source)}: {page} does not exist"
