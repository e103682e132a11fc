"""Every command in the README runs as written.

The fenced code blocks of README.md are extracted and checked against the code:

- bash blocks: each `ladmim ...` line parses with the real `ladmim` parser (a renamed flag fails here);
  `make X` names a Makefile target; `python scripts/X.py ...`, `python -m MODULE ...` and
  `accelerate launch ... scripts/X.py ...` name a script or module that exists, and their flags parse
  (the scripts take exactly the flags of a `ladmim` subcommand); `--config` names a config that exists;
  `pip install` lines are not checked.
- python blocks compile; "Use it from Python" and the Hub block are executed against a tiny trained model
  folder, with the model path, the image names and the Hub id replaced by local files.

Also: the README stays short, its usage comes first, its links and layout table point at files that
exist, and the list of files shipped to the Hub is the one `ladmim_hf.hub` ships.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINES = README.read_text(encoding="utf-8").splitlines()

MAX_LINES = 220
USAGE_WITHIN = 80  # `make demo` and "Train on your own images" must be this close to the top

# The scripts take the flags of a `ladmim` subcommand (their docstrings say so), so they parse with it.
SCRIPT_SUBCOMMANDS = {
    "scripts/train.py": "train",
    "scripts/evaluate.py": "evaluate",
    "scripts/push_to_hub.py": "push",
    "scripts/convert_official_checkpoint.py": "convert",
}
MODULE_SUBCOMMANDS = {"ladmim_hf.data.synthetic": "synth"}


@dataclass
class Block:
    language: str
    code: str
    line: int  # 1-based line of the block's first code line
    heading: str  # the nearest "##"/"###" heading above the block


def code_blocks() -> list[Block]:
    blocks, heading, current = [], "", None
    for number, line in enumerate(LINES, 1):
        if current is None:
            opening = re.match(r"^```(\S*)\s*$", line)
            if opening:
                current = Block(opening.group(1), "", number + 1, heading)
                body = []
            elif re.match(r"^#{2,3} ", line):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            current.code = "\n".join(body) + "\n"
            blocks.append(current)
            current = None
        else:
            body.append(line)
    assert current is None, f"README.md: the code block opened at line {current.line - 1} is never closed"
    return blocks


def blocks_in(*languages: str) -> list[Block]:
    return [block for block in code_blocks() if block.language in languages]


def block_under(heading: str, language: str = "python") -> Block:
    found = [block for block in blocks_in(language) if block.heading == heading]
    assert len(found) == 1, f"README.md: expected one {language} block under '## {heading}', found {len(found)}"
    return found[0]


def command_lines() -> list[tuple[int, list[str]]]:
    """(README line, tokens) of every command in the bash blocks: continuation lines joined, comments and
    leading VAR=value assignments dropped."""
    commands = []
    for block in blocks_in("bash", "sh", "shell"):
        pending, start = "", None
        for offset, line in enumerate(block.code.splitlines()):
            start = block.line + offset if not pending else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            tokens = shlex.split(pending + line, comments=True)
            pending = ""
            while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
                tokens = tokens[1:]
            if tokens:
                commands.append((start, tokens))
    return commands


def ladmim_parser():
    """The real `ladmim` parser, but without prefix matching: argparse would accept `--out` for `--output_dir`,
    so a flag renamed to a longer name would still "parse" as written in the README."""
    import argparse

    from ladmim_hf.cli import build_parser

    parser = build_parser()
    pending = [parser]
    while pending:
        current = pending.pop()
        current.allow_abbrev = False
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    return parser


def parse_or_fail(argv: list[str], where: str) -> None:
    """Parse `ladmim ARGV` as the command line would; argparse's error (it exits) becomes a test failure."""
    try:
        args = ladmim_parser().parse_args(argv)
    except SystemExit as error:  # argparse printed the reason to stderr
        pytest.fail(f"{where}: `ladmim {shlex.join(argv)}` does not parse (exit {error.code})")
    config = getattr(args, "config", None)
    if config:  # a path in the repository, or the name of a config shipped inside the package
        exists = (ROOT / config).is_file() if config.endswith((".yaml", ".yml")) else \
            (ROOT / "ladmim_hf" / "configs" / f"{config}.yaml").is_file()
        assert exists, f"{where}: --config {config} names no config"


def makefile_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        rule = re.match(r"^([A-Za-z0-9_.\- ]+):(?!=)", line)
        if rule:
            targets.update(rule.group(1).split())
    return targets


def check_script(path: str, args: list[str], where: str) -> None:
    assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
    if "..." in args:  # a placeholder for "the same flags as above"
        return
    if path in SCRIPT_SUBCOMMANDS:
        parse_or_fail([SCRIPT_SUBCOMMANDS[path], *args], where)
        return
    # Any other script: parse its flags if it exposes its parser.
    spec = importlib.util.spec_from_file_location(f"_readme_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str((ROOT / path).parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str((ROOT / path).parent))
    if hasattr(module, "build_parser"):
        try:
            module.build_parser().parse_args(args)
        except SystemExit as error:
            pytest.fail(f"{where}: `python {path} {shlex.join(args)}` does not parse (exit {error.code})")


def check_module(name: str, args: list[str], where: str) -> None:
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{where}: no module {name}"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        assert importlib.util.find_spec(f"{name}.__main__") is not None, f"{where}: `python -m {name}` has no __main__"
    if name in MODULE_SUBCOMMANDS and "..." not in args:
        parse_or_fail([MODULE_SUBCOMMANDS[name], *args], where)


# ------------------------------------------------------------------------------------------------
# Shape of the README
# ------------------------------------------------------------------------------------------------


def test_readme_is_short_and_starts_with_usage():
    assert len(LINES) <= MAX_LINES, f"README.md has {len(LINES)} lines; keep it under {MAX_LINES} (details go to docs/)"
    make_demo = next(n for n, line in enumerate(LINES, 1) if line.startswith("make demo"))
    own_images = next(n for n, line in enumerate(LINES, 1) if line.startswith("## Train on your own images"))
    assert make_demo <= USAGE_WITHIN, f"`make demo` is on line {make_demo}"
    assert own_images <= USAGE_WITHIN, f"'Train on your own images' starts on line {own_images}"


def anchors(markdown: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    slugs, in_code = set(), False
    for line in markdown.read_text(encoding="utf-8").splitlines():
        in_code ^= line.startswith("```")
        if not in_code and re.match(r"^#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


@pytest.mark.parametrize("document", ["README.md", "docs/results.md", "docs/experiments.md", "docs/usage.md",
                                      "docs/reliability.md", "benchmarks/README.md"])
def test_links_point_to_files_and_headings(document):
    source = ROOT / document
    targets = re.findall(r"\]\(([^)\s]+)\)", source.read_text(encoding="utf-8"))
    assert targets or document != "README.md"
    for target in targets:
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        assert linked.exists(), f"{document} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{document} links to {target}: no such heading in {linked.name}"


def test_layout_table_lists_what_exists():
    start = LINES.index("## Layout")
    rows = [line for line in LINES[start:] if line.startswith("| `")]
    assert rows, "no layout table under '## Layout'"
    for row in rows:
        for path in re.findall(r"`([^`]+)`", row.split("|")[1]):
            where = ROOT / path
            assert (where.is_dir() if path.endswith("/") else where.is_file()), \
                f"the layout table lists {path}, which does not exist" + (" as a directory" if path.endswith("/") else "")


def test_shipped_files_are_the_ones_the_hub_code_ships():
    from ladmim_hf.hub import CODE_FILES

    paragraph = next(i for i, line in enumerate(LINES) if line.startswith("The files shipped to the Hub"))
    text = " ".join(LINES[paragraph:paragraph + 6])
    listed = re.search(r"\(([^)]*)\)", text).group(1)
    assert set(re.findall(r"`([^`]+\.py)`", listed)) == set(CODE_FILES)


# ------------------------------------------------------------------------------------------------
# Shell commands
# ------------------------------------------------------------------------------------------------


def test_every_shell_command_is_checked():
    commands = command_lines()
    assert any(tokens[0] == "ladmim" for _, tokens in commands)
    targets = makefile_targets()
    for line, tokens in commands:
        where = f"README.md:{line}"
        program, args = tokens[0], tokens[1:]
        if program == "ladmim":
            parse_or_fail(args, where)
        elif program == "make":
            for target in (arg for arg in args if "=" not in arg and not arg.startswith("-")):
                assert target in targets, f"{where}: `make {target}`: no such target in the Makefile"
        elif program in ("python", "python3") and args[:1] == ["-m"]:
            check_module(args[1], args[2:], where)
        elif program in ("python", "python3"):
            check_script(args[0], args[1:], where)
        elif program == "accelerate":
            assert args[:1] == ["launch"], f"{where}: only `accelerate launch` is checked"
            script = next(i for i, arg in enumerate(args) if arg.endswith(".py"))
            check_script(args[script], args[script + 1:], where)
        elif program == "pip":
            continue
        else:
            pytest.fail(f"{where}: `{program}` is not a command this test knows how to check; teach it")


def test_inline_ladmim_commands_parse():
    """`ladmim ... --flag ...` quoted in the prose is a command too."""
    for number, line in enumerate(LINES, 1):
        for span in re.findall(r"`(ladmim [^`]*--[^`]*)`", line):
            parse_or_fail(shlex.split(span)[1:], f"README.md:{number}")


def test_parser_catches_a_renamed_flag():
    """The check above would catch a renamed flag: a wrong one fails the same way."""
    with pytest.raises(pytest.fail.Exception):
        parse_or_fail(["predict", "a.png", "--model", "m", "--no_such_flag"], "here")


# ------------------------------------------------------------------------------------------------
# Python blocks
# ------------------------------------------------------------------------------------------------


def test_every_python_block_compiles():
    blocks = blocks_in("python")
    assert blocks
    for block in blocks:
        try:
            compile(block.code, f"README.md:{block.line}", "exec")
        except SyntaxError as error:
            pytest.fail(f"README.md:{block.line + (error.lineno or 1) - 1}: {error.msg}")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny trained detector with every branch, saved as training saves it (model, processor, pipeline),
    and two small images."""
    from conftest import fitted_branch_model

    from ladmim_hf import LadmimImageProcessor
    from ladmim_hf.hub import add_pipeline_to_folder

    folder = tmp_path_factory.mktemp("readme") / "model"
    model = fitted_branch_model(fusion_rule="sum")
    model.save_pretrained(folder)
    LadmimImageProcessor(size=64).save_pretrained(folder)
    add_pipeline_to_folder(folder)
    images = []
    for index in range(2):
        path = folder.parent / f"image_{index}.png"
        Image.fromarray((np.random.default_rng(index).random((48, 60, 3)) * 255).astype(np.uint8)).save(path)
        images.append(str(path))
    return folder, images, list(model.categories)


def substitute(code: str, old: str, new: str) -> str:
    assert old in code, f"the README block no longer contains {old!r}: update tests/test_readme.py"
    return code.replace(old, new)


def known_category(code: str, categories: list[str]) -> str:
    """Point every category="..." at one the tiny model was trained on."""
    return re.sub(r'category="([^"]*)"',
                  lambda m: f'category="{m.group(1) if m.group(1) in categories else categories[0]}"', code)


def run_block(code: str, where: str) -> dict:
    """Execute a block; the value of its last expression (if any) lands in namespace["_"]."""
    tree = ast.parse(code)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        tree.body[-1] = ast.Assign(targets=[ast.Name("_", ast.Store())], value=tree.body[-1].value)
        ast.fix_missing_locations(tree)
    namespace: dict = {}
    exec(compile(tree, where, "exec"), namespace)  # noqa: S102 (the README's own example)
    return namespace


def test_use_it_from_python_runs(model_folder):
    folder, images, categories = model_folder
    block = block_under("Use it from Python")
    code = substitute(block.code, '"outputs/synthloco/model"', repr(str(folder)))
    code = substitute(code, '["tray_1.png", "tray_2.png"]', repr(images))
    namespace = run_block(known_category(code, categories), f"README.md:{block.line}")

    out = namespace["out"]
    assert tuple(out.pred_score.shape) == (2,)
    assert out.memory_bank_score is not None and out.global_score is not None
    assert set(namespace["_"]) == {"logical", "structural", "memory_bank", "global"}  # out.branch_scores()


def test_hub_block_runs_with_a_local_folder(model_folder):
    folder, images, categories = model_folder
    block = block_under("On the Hugging Face Hub")
    code = substitute(block.code, '"org/ladmim-loco"', repr(str(folder)))
    code = re.sub(r',\s*revision="[^"]*"', "", code)  # a local folder has no revisions
    code = substitute(code, '"tray.png"', repr(images[0]))
    namespace = run_block(known_category(code, categories), f"README.md:{block.line}")

    result = namespace["_"]
    promised = re.search(r"# -> (\{.*\})", block.code).group(1)
    for key in re.findall(r'"(\w+)":', promised):
        assert key in result, f"the Hub block promises {key!r}; the pipeline returned {sorted(result)}"
    assert result["label"] in ("anomalous", "good")
