"""The README and docs/ are true to the code: the README stays a front door (short, linking
every page), every link and anchor resolves, every `breakscene` command and flag written in
them exists, the job files they show load, the output schemas they list are the tables'
own, and their Python snippets run as written (the diffusers one without this project).
docs/cli.md and docs/job-files.md are generated from the parser and the job models
(commands/reference.py) and must equal what would be generated now."""
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, create_model

from commands.main import build_parser
from commands.options import CommandParser
from conftest import ROOT, write_scene

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 220
PROJECT = ("breakscene", "pipeline", "batchjob", "commands", "robustness", "benchmarks")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def fenced_blocks(text: str, lang: str | None = None) -> list[str]:
    """The bodies of the ``` blocks (of language ``lang`` when given)."""
    return [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
            if lang is None or tag == lang]


def code_segments(text: str) -> list[str]:
    """Fenced blocks, then the inline `code` spans of the prose around them."""
    prose = re.sub(r"^```\w*\n.*?^```", "", text, flags=re.S | re.M)
    return fenced_blocks(text) + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: dict[str, int] = {}
    body = re.sub(r"^```\w*\n.*?^```", "", page.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#+ (.+)$", body, re.M):
        base = slug(heading)
        n = found.get(base, 0)
        found[base] = n + 1
        if n:
            found[f"{base}-{n}"] = 1
    return set(found)


def links(page: Path) -> list[str]:
    body = re.sub(r"^```\w*\n.*?^```", "", page.read_text(), flags=re.S | re.M)
    return re.findall(r"\]\(([^)\s]+)\)", body)


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines, over {MAX_README_LINES}"
    linked = {target.split("#")[0] for target in links(README)}
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"
    # the pages written by others are linked too, and must exist (links resolve, below)
    for name in ("cli.md", "job-files.md", "deployment.md"):
        assert f"docs/{name}" in linked


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link {target} names a missing file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: link {target}: {file.name} has no heading #{anchor}"


def subcommands(parser: CommandParser) -> dict[str, CommandParser]:
    return dict(parser.commands)


# `breakscene` where a command starts: a segment's or line's start (after a `$ ` prompt), or
# after `-- `, `&& `, `; `, `| `; never a word in a sentence ("not a breakscene output").
COMMAND = re.compile(r"(?:^|(?<=-- )|(?<=&& )|(?<=; )|(?<=\| ))(?:\$ )?breakscene(?![\w.:/-])"
                     r"(?P<rest>(?:(?!&&|\|\s|;\s)[^\n])*)", re.M)


def commands_in(segment: str) -> list[str]:
    """Each `breakscene ...` command line of a code segment, continuation lines joined and
    comments, quoted arguments and what follows `&&` / `|` / `;` dropped."""
    joined = re.sub(r"\\\n\s*", " ", segment)
    found = []
    for m in COMMAND.finditer(joined):
        rest = re.sub(r"\"[^\"]*\"|'[^']*'", "ARG", m.group("rest"))
        rest = rest.split(" #")[0]
        found.append(" ".join(rest.split()))
    return found


def problems(command: str, parser: CommandParser) -> list[str]:
    """What in ``breakscene <command>`` the parser does not know: the command, or flags."""
    words = command.split()
    if not words or words[0].startswith("-"):  # `breakscene --version`
        accepted, flags = parser.option_strings(), words
    else:
        subs = subcommands(parser)
        name = words[0].rstrip(":")  # `breakscene run: N of M manifest rows failed`
        if name not in subs:
            return [f"{name} is not a command ({', '.join(subs)})"]
        accepted, flags = subs[name].option_strings(), words[1:]
    flags = re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", " ".join(flags))
    return [f"{flag} is not an option" for flag in flags if flag.split("=")[0] not in accepted]


def test_commands_and_flags_exist():
    parser = build_parser()
    written = [(page.name, command) for page in pages() for segment in code_segments(page.read_text())
               for command in commands_in(segment)]
    assert len(written) > 40  # the pages do show commands: the scan found them
    wrong = [f"{page}: `breakscene {command}`: {problem}" for page, command in written
             for problem in problems(command, parser)]
    assert not wrong, "\n".join(wrong)


def test_the_scan_finds_commands_and_reports_what_is_wrong():
    parser = build_parser()
    (command,) = commands_in("breakscene extract --scene s \\\n    --bogus 1 --out o  # --not-this")
    assert command == "extract --scene s --bogus 1 --out o"
    assert problems(command, parser) == ["--bogus is not an option"]
    assert commands_in("ray job submit -- breakscene run j.yaml && breakscene gc o") == ["run j.yaml", "gc o"]
    assert problems("extrakt --scene s", parser)[0].startswith("extrakt is not a command")
    assert problems('generate --prompt ARG --out x.png --output y', parser) == []
    assert commands_in("error: PATH is not a breakscene output") == []


def test_exit_codes_of_run_help_are_in_the_docs():
    run_help = subcommands(build_parser())["run"].epilog
    codes = re.findall(r"(?:^|; )(\d+(?: / \d+)?) ", run_help.removeprefix("exit status: "))
    assert set(codes) == {"0", "1", "2", "3", "4", "130 / 143"}
    table = (DOCS / "bad-input.md").read_text()
    readme = README.read_text()
    for code in codes:
        assert re.search(rf"^\| {' / '.join(f'`{c}`' for c in code.split(' / '))} \|", table, re.M), code
        assert " / ".join(f"`{c}`" for c in code.split(" / ")) in readme, code


def test_outputs_page_lists_every_column_of_the_tables():
    from pipeline.records import CONCEPTS_SCHEMA, IMAGES_SCHEMA, MASKS_SCHEMA

    text = (DOCS / "outputs.md").read_text()
    for name, schema in (("images", IMAGES_SCHEMA), ("masks", MASKS_SCHEMA), ("concepts", CONCEPTS_SCHEMA)):
        section = text.split(f"### `{name}/`", 1)[1].split("###", 1)[0]
        listed = re.findall(r"^\| `(\w+)` \|", section, re.M)
        assert listed == schema.names, name


def yaml_jobs() -> list[tuple[str, str]]:
    return [(page.name, block) for page in pages() for block in fenced_blocks(page.read_text(), "yaml")
            if re.search(r"^output:", block, re.M)]


def test_job_files_shown_in_the_docs_load(tmp_path):
    from commands.jobs import load_job

    jobs = yaml_jobs()
    assert {page for page, _ in jobs} >= {"README.md", "study.md"}
    for i, (page, block) in enumerate(jobs):
        path = tmp_path / f"job{i}.yaml"
        path.write_text(block)
        job = load_job(path)  # validated as `breakscene run` validates it: no error
        assert job.output.startswith("s3://"), page
    readme_job = load_job(tmp_path / "job0.yaml")
    assert readme_job.extract.phase2_mode == "lora" and readme_job.segmenter.kind == "sam"


def run_snippet(code: str, cwd: Path, block_project: bool) -> subprocess.CompletedProcess:
    blocker = (
        "import importlib.abc, sys\n"
        "class NoProject(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {PROJECT!r}:\n"
        "            raise ImportError('the snippet imported ' + name)\n"
        "sys.meta_path.insert(0, NoProject())\n") if block_project else ""
    (cwd / "snippet.py").write_text(blocker + code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "snippet.py"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def replace_line(code: str, name: str, value: str) -> str:
    """``name = "..."`` set to ``value``; the line must be there."""
    new, n = re.subn(rf'^{name} = "[^"]*"', f"{name} = {value!r}", code, count=1, flags=re.M)
    assert n == 1, f"the snippet has no line {name} = \"...\""
    return new


def test_table_snippets_read_a_real_output(tmp_path):
    from pipeline.records import write_tables

    out = tmp_path / "out"
    rows = [{"image": {"image_id": iid, "image_uri": f"{iid}.png", "manifest_row": i, "width": 64, "height": 64,
                       "status": "ok", "error": None, "warnings": [], "mask_source": "user", "n_masks": 2,
                       "n_concepts": 2, "bundle_uri": "", "run_id": "r1", "meta": "{}"},
             "masks": [{"image_id": iid, "mask_index": k, "source": "user", "rle": {"size": [64, 64], "counts": "x"},
                        "quality": 0.5 + k / 10, "selected": True, "run_id": "r1"} for k in range(2)],
             "concepts": []} for i, iid in enumerate(["bear", "toys"])]
    write_tables(str(out), rows, run_id="r1")
    snippets = [(page.name, block) for page in pages() for block in fenced_blocks(page.read_text(), "python")
                if "DeltaTable(" in block]
    assert {page for page, _ in snippets} == {"README.md", "outputs.md"}
    for page, block in snippets:
        proc = run_snippet(replace_line(block, "out", str(out)), tmp_path, block_project=True)
        assert proc.returncode == 0, f"{page}: {proc.stderr[-2000:]}"
        assert re.search(r"ok\s+2", proc.stdout) and "bear" in proc.stdout and "0.6" in proc.stdout, proc.stdout


@pytest.mark.e2e
def test_readme_diffusers_snippet_runs_without_the_project(tmp_path):
    from commands.main import main

    scene = write_scene(tmp_path / "scene")
    bundle, base = tmp_path / "bundle", tmp_path / "tiny-diffusers"
    assert main(["extract", "--scene", str(scene), "--model", "tiny", "--smoke", "--phase2-mode", "lora",
                 "--out", str(bundle)]) == 0
    assert main(["export-base", "tiny", str(base)]) == 0
    (block,) = [b for b in fenced_blocks(README.read_text(), "python") if "StableDiffusionPipeline" in b]
    code = replace_line(replace_line(block, "bundle", str(bundle)), "base", str(base))
    code += "\nassert not [m for m in sys.modules if m.split('.')[0] in " + repr(PROJECT) + "]\n"
    proc = run_snippet(code, tmp_path, block_project=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    assert Image.open(tmp_path / "beach.png").size == (64, 64)


# --- the generated references: docs/cli.md and docs/job-files.md ----------------------------

def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of a job model as written in a job file (``selection.min_quality``): sections
    (a model, or a model or null) are walked, anything else is a leaf."""
    keys = []
    for name, field in model.model_fields.items():
        types = typing.get_args(field.annotation) or (field.annotation,)
        sections = [t for t in types if isinstance(t, type) and issubclass(t, BaseModel)]
        keys += leaf_keys(sections[0], f"{prefix}{name}.") if sections else [prefix + name]
    return keys


def reference_check(docs: Path, capsys) -> tuple[int, str]:
    """``python -m commands.reference --check --docs DOCS`` in this process: (status, stderr)."""
    from commands import reference

    status = reference.main(["--check", "--docs", str(docs)])
    return status, capsys.readouterr().err


def test_the_references_are_what_the_parser_and_the_models_generate():
    from commands import reference

    generated = reference.pages()
    assert set(generated) == {"cli.md", "job-files.md"}
    for name, text in generated.items():
        assert (DOCS / name).read_text() == text, f"docs/{name} is stale: run `make docs`"
        assert str(ROOT) not in text and "/home/" not in text and "/tmp" not in text  # no machine paths
    assert reference.pages() == generated  # deterministic: the same twice


def planted_job_model():
    """JobConfig with one more key under ``selection``, as a change to pipeline/config.py makes."""
    from pipeline.config import JobConfig, SelectionConfig

    selection = create_model("PlantedSelection", __base__=SelectionConfig,
                             max_blur=(float, Field(0.3, ge=0, lt=2, description="a planted key")))
    return create_model("PlantedJob", __base__=JobConfig, selection=(selection, Field(default_factory=selection)))


def test_a_changed_parser_or_job_model_is_a_stale_page(tmp_path, capsys):
    from commands import reference
    from robustness.grid import StudyConfig

    parser = build_parser()
    parser.commands["extract"].add_argument("--planted-option", type=int, default=3, help="a planted option")
    cli = reference.cli_page(parser)
    row = next(line for line in cli.splitlines() if "`--planted-option`" in line)
    assert "integer" in row and "`3`" in row and "a planted option" in row
    jobs = reference.job_files_page({"extract": planted_job_model(), "study": StudyConfig})
    row = next(line for line in jobs.splitlines() if "`selection.max_blur`" in line)
    assert ">= 0" in row and "< 2" in row and "`0.3`" in row and "a planted key" in row
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("cli.md", "job-files.md"):
        (docs / name).write_text((DOCS / name).read_text())
    assert reference_check(docs, capsys) == (0, "")
    for name, planted in (("cli.md", cli), ("job-files.md", jobs)):
        committed = (docs / name).read_text()
        (docs / name).write_text(planted)
        status, err = reference_check(docs, capsys)
        (line,) = err.strip().splitlines()
        assert status == 1 and str(docs / name) in line and "python -m commands.reference" in line
        (docs / name).write_text(committed)
    (docs / "cli.md").unlink()
    assert "cli.md" in reference_check(docs, capsys)[1]


def test_the_reference_command_writes_both_pages_and_checks_them(tmp_path, capsys):
    from commands import reference

    assert reference.main(["--docs", str(tmp_path)]) == 0
    for name in ("cli.md", "job-files.md"):
        assert (tmp_path / name).read_text() == (DOCS / name).read_text()
    (tmp_path / "job-files.md").write_text("stale\n")
    # the command as `make docs` and CI run it: a stale page is exit status 1 and one line
    proc = subprocess.run([sys.executable, "-m", "commands.reference", "--check", "--docs", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: ") and "job-files.md" in line and "cli.md" not in line


def test_every_command_and_option_is_in_the_cli_reference():
    parser = build_parser()
    text = (DOCS / "cli.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for name, command in [("", parser), *parser.commands.items()]:
        assert f"## `breakscene{' ' + name if name else ''}`" in text, name
        for action in command.options:
            for flag in action.option_strings or [action.metavar or action.dest]:
                assert any(f"`{flag}`" in row for row in rows), f"breakscene {name} {flag}"
    assert "exit status: " not in text and "`130` / `143`" in text  # the epilogs, as lists
    assert "%(default)s" not in text


def test_every_job_key_is_in_the_job_file_reference():
    from pipeline.config import JobConfig
    from robustness.grid import StudyConfig

    text = (DOCS / "job-files.md").read_text()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| `")}
    keys = leaf_keys(JobConfig) + leaf_keys(StudyConfig)
    assert len(set(keys)) > 100 and "storage.timeout_s" in keys and "scenes.coco.min_area" in keys
    missing = [key for key in keys if f"`{key}`" not in rows]
    assert not missing, missing
    assert "per request" in rows["`storage.timeout_s`"]  # a comment beside the field
    assert ">= 0" in rows["`selection.min_quality`"] and "<= 1" in rows["`selection.min_quality`"]
    assert "`full`, `lora`" in rows["`extract.phase2_mode`"]
    undocumented = [key for key, row in rows.items() if row.rstrip().endswith("|  |")]
    assert not undocumented, f"keys without a description: {undocumented}"


def test_submit_help_says_the_exit_status_it_returns():
    """`submit --help` names each code `exit_status` passes through as what `breakscene run`
    exited with, and says nothing of a 4 turned into a 3."""
    from batchjob.submit import exit_status

    epilog = build_parser().commands["submit"].epilog
    for code in (2, 3, 4):
        assert exit_status("FAILED", f"Job entrypoint command failed with exit code {code}") == code
    items = dict(re.findall(r"(?:^exit status: |; )(\d+) ([^;]+)", epilog))
    assert set(items) == {"0", "1", "2", "3", "4"}, items
    assert "exited 3" in items["3"] and "exited 4" in items["4"] and "or 4" not in items["3"]
