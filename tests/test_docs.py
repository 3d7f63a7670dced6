"""README.md and docs/*.md stay true to the repository.

Checked in every markdown file (README.md and the files directly in docs/):

- README.md is at most ``README_MAX_LINES`` lines (the details live in docs/);
- relative links ``[text](path)``, ``[text](path#anchor)``, ``[text](#anchor)`` and reference
  definitions ``[id]: path`` point to an existing file, and an anchor to a heading of the target
  (GitHub's slug rule, see :func:`github_slug`); http(s)://, mailto: and other schemes are skipped;
- no issue-tracker references ("issue 23", "issues #4", "#12"): the docs are read without the
  tracker. A line that names an upstream project (a github.com/.../issues/N URL or one of
  ``UPSTREAM_WORDS``) may cite that project's issue;
- every ``python -m pretrain ...`` / ``python -m data_pipelines ...`` command in fenced code blocks
  and inline code spans parses with that package's own ``build_parser()``, and when it names a
  config (a repo file, or a placeholder such as CONFIG.yaml, read as configs/demo.yaml) the config
  loads with the documented overrides through ``pretrain.config.load_config``, so a misspelt
  subcommand, option or key fails. A transcript line ``$ command`` followed by an error message is
  a documented failure: it must fail, with that message;
- every ``make TARGET`` in code exists (``make -n TARGET``);
- every path under launch/ or configs/ that the text mentions exists (globs, placeholders and the
  reader's own files, named my_*, excepted).

Placeholders in commands: the brackets of ``[optional ...]`` groups are dropped and their contents
checked; ``{a,b}`` and ``a|b`` are expanded into one command per alternative; ``...``, ``…`` and
``key=value`` are dropped (after an option they stand for its value); an upper-case word (CONFIG,
DIR, N, RUN_DIR/x) or ``$VAR`` stands for a value: a config file when it is CONFIG or ends in
.yaml, else "1" after an option; an override whose value is a placeholder keeps its key checked,
its value taken from the config. A config that is neither in the repository nor a placeholder
(my_run.yaml) is the reader's own: its command is parsed, its overrides not loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKDOWN = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300
PLACEHOLDER_CONFIG = "configs/demo.yaml"  # what CONFIG / CONFIG.yaml / MY.yaml stand for
PACKAGES = ("pretrain", "data_pipelines")
UPSTREAM_WORDS = ("DeepSpeed", "PyTorch", "pytorch", "datasets", "transformers", "wandb")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


# --------------------------------------------------------------------------------------------
# Reading markdown: fenced blocks, prose paragraphs, code spans, headings
# --------------------------------------------------------------------------------------------

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)


@dataclasses.dataclass
class Markdown:
    """One markdown file split into fenced code and prose. Line numbers are 1-based."""

    lines: list[str]
    fenced: list[bool]  # per line: inside a fenced block or a fence delimiter
    code: list[tuple[int, list[str]]]  # fenced blocks: (line number of the first content line, lines)

    @classmethod
    def parse(cls, text: str) -> Markdown:
        lines = text.splitlines()
        fenced: list[bool] = []
        blocks: list[tuple[int, list[str]]] = []
        fence = None
        for n, line in enumerate(lines, 1):
            m = FENCE.match(line)
            if fence is None:
                fenced.append(bool(m))
                if m:
                    fence = m.group(1)
                    blocks.append((n + 1, []))
                continue
            fenced.append(True)
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line[m.end():].strip():
                fence = None
            else:
                blocks[-1][1].append(line)
        return cls(lines, fenced, blocks)

    def paragraphs(self) -> Iterator[tuple[int, str]]:
        """Prose paragraphs (runs of non-blank lines outside fences): (first line number, text)."""
        start, buf = 0, []
        for n, (line, fenced) in enumerate(zip(self.lines, self.fenced, strict=True), 1):
            if fenced or not line.strip():
                if buf:
                    yield start, "\n".join(buf)
                buf = []
                continue
            if not buf:
                start = n
            buf.append(line)
        if buf:
            yield start, "\n".join(buf)

    def code_spans(self) -> Iterator[tuple[int, str]]:
        """Inline code spans in prose (they may wrap): (line number, content on one line)."""
        for start, para in self.paragraphs():
            for m in CODE_SPAN.finditer(para):
                yield start + para.count("\n", 0, m.start()), " ".join(m.group(2).split())

    def headings(self) -> list[str]:
        """ATX and setext headings outside fences, in order."""
        out = []
        for i, line in enumerate(self.lines):
            if self.fenced[i]:
                continue
            m = re.match(r"^ {0,3}#{1,6}(?:\s+(.*?))?\s*$", line)
            if m:
                out.append(re.sub(r"\s+#+\s*$", "", m.group(1) or ""))
            elif (i > 0 and re.match(r"^ {0,3}(=+|-+)\s*$", line) and not self.fenced[i - 1]
                  and self.lines[i - 1].strip() and "|" not in self.lines[i - 1]
                  and not re.match(r"^ {0,3}(#|[-*+] |\d+[.)] |>)", self.lines[i - 1])):
                out.append(self.lines[i - 1].strip())
        return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, HTML tags dropped, lower case,
    every character that is not a letter, digit, space, hyphen or underscore removed (backticks,
    dots, colons, ...), each space a hyphen. Underscores are kept, as GitHub keeps them."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return "".join(ch for ch in text if ch.isalnum() or ch in " -_").replace(" ", "-")


def anchors(md: Markdown) -> set[str]:
    """Every anchor of a file: heading slugs (repeats get -1, -2, ...) and HTML name/id anchors."""
    seen: dict[str, int] = {}
    out = set()
    for h in md.headings():
        slug = github_slug(h)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    for line in md.lines:
        out.update(re.findall(r"<a\s+[^>]*(?:name|id)=\"([^\"]+)\"", line))
    return out


# --------------------------------------------------------------------------------------------
# Check 2: links
# --------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")


def link_problems(path: Path, text: str) -> list[str]:
    md = Markdown.parse(text)
    targets: list[tuple[int, str]] = []
    for start, para in md.paragraphs():
        blanked = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), para)  # links in code are code
        for m in LINK.finditer(blanked):
            targets.append((start + blanked.count("\n", 0, m.start()), m.group(1)))
        for k, line in enumerate(blanked.split("\n")):
            m = REFERENCE_DEF.match(line)
            if m:
                targets.append((start + k, m.group(1)))
    here = path.resolve()
    problems, cache = [], {here: anchors(md)}  # the file itself: as given, even before it is saved
    for line, target in targets:
        if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http(s):, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else here
        where = f"{_rel(path)}:{line}: link ({target})"
        if dest != here and not dest.exists():
            problems.append(f"{where}: {_rel(dest)} does not exist")
            continue
        if anchor and (dest == here or dest.is_file() and dest.suffix.lower() in (".md", ".markdown")):
            if dest not in cache:
                cache[dest] = anchors(Markdown.parse(dest.read_text(encoding="utf-8")))
            if unquote(anchor) not in cache[dest]:
                near = sorted(a for a in cache[dest] if a.split("-")[0] == anchor.split("-")[0])[:5]
                problems.append(f"{where}: no heading with anchor #{anchor} in {_rel(dest)}"
                                + (f" (similar: {', '.join('#' + a for a in near)})" if near else ""))
    return problems


# --------------------------------------------------------------------------------------------
# Check 3: issue-tracker references
# --------------------------------------------------------------------------------------------

ISSUE_REFS = (
    re.compile(r"\b(?:[Ii]ssues?|PRs?|[Pp]ull requests?)\s+#?\d+"),  # issue 23, issues #4, PR 7
    re.compile(r"(?<![\w/&#])#\d{1,5}\b"),  # #12 (not &#8212; nor page#12)
)
UPSTREAM = re.compile(r"github\.com/[\w.-]+/[\w.-]+/(?:issues|pull)/\d+|\b(?:"
                      + "|".join(map(re.escape, UPSTREAM_WORDS)) + r")\b")


def issue_problems(path: Path, text: str) -> list[str]:
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        scan = re.sub(r"\]\(#[^)]*\)", "](#)", line)  # same-file anchors such as (#1-setup) are not issues
        hits = [m.group(0) for rx in ISSUE_REFS for m in rx.finditer(scan)]
        if hits and not UPSTREAM.search(line):
            problems.append(f"{_rel(path)}:{n}: issue-tracker reference {', '.join(map(repr, hits))} "
                            "(say what it is instead; an upstream project's issue names the project on the line)")
    return problems


# --------------------------------------------------------------------------------------------
# Shell commands in code: fenced lines (continuations joined) and inline spans
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Command:
    line: int
    text: str
    inline: bool
    expected_error: str | None = None  # first line of a documented failure's output


def commands(md: Markdown) -> list[Command]:
    out = []
    for first, lines in md.code:
        prompted = any(re.match(r"^\s*\$ ", x) for x in lines)  # a transcript: commands are the `$ ` lines
        i = 0
        while i < len(lines):
            start, cmd = i, lines[i]
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            if prompted:
                m = re.match(r"^\s*\$ (.*)", cmd)
                if not m:
                    continue
                cmd = m.group(1)
                output = lines[i] if i < len(lines) and not re.match(r"^\s*\$ ", lines[i]) else ""
                err = output.strip() if re.match(r"^\s*(config error|error|usage):", output) else None
                out.append(Command(first + start, cmd.strip(), False, err))
            else:
                out.append(Command(first + start, cmd.strip(), False))
    out += [Command(n, re.sub(r"^\$ ", "", span), True) for n, span in md.code_spans()]
    return out


ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_OPS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1", "&>"}


def _unwrap_optional_groups(cmd: str) -> str:
    """``[--dtype fp32|bf16]`` -> `` --dtype fp32|bf16 ``: brackets that start a word (outside
    quotes) mark documented optional arguments, which are checked like the others. ``key=[a,b]``
    and ``'data.sources[1].path=x'`` are values and stay."""
    drop: set[int] = set()
    quote = None
    for i, ch in enumerate(cmd):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[" and (i == 0 or cmd[i - 1].isspace() or i - 1 in drop):
            depth = 0
            for j in range(i, len(cmd)):
                depth += {"[": 1, "]": -1}.get(cmd[j], 0)
                if depth == 0:
                    drop.update((i, j))
                    break
    return "".join(" " if i in drop else ch for i, ch in enumerate(cmd))


def _strip_comment(cmd: str) -> str:
    """The command without its shell comment (a ``#`` that starts a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(cmd):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or cmd[i - 1].isspace()):
            return cmd[:i]
    return cmd


def _tokens(cmd: str) -> list[str]:
    toks = shlex.split(_unwrap_optional_groups(_strip_comment(cmd)))
    for k, t in enumerate(toks):
        if t in SHELL_OPS or t.startswith((">", "2>")):
            return toks[:k]
    return toks


def _strip_env(toks: list[str]) -> list[str]:
    k = 0
    while k < len(toks) and ENV_ASSIGN.match(toks[k]):
        k += 1
    return toks[k:]


def package_args(cmd: str) -> tuple[str, list[str]] | None:
    """(package, its arguments) when ``cmd`` runs ``python -m pretrain|data_pipelines`` (also after
    env assignments and under torchrun / deepspeed / srun), else None."""
    if not re.search(r"(?:-m|--module)\s+(?:pretrain|data_pipelines)(?:\s|$)", cmd):
        return None
    toks = _strip_env(_tokens(cmd))
    if not toks or not re.match(r"^(?:.*/)?(?:python[\d.]*|torchrun|deepspeed|srun)$|^\$\{?PY", toks[0]):
        return None
    for k, t in enumerate(toks[:-1]):
        if t in ("-m", "--module") and toks[k + 1] in PACKAGES:
            return toks[k + 1], toks[k + 2 :]
    return None


PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*(?:$|[/.])|.*\$|.*\.\.\.|.*…|.*<[^>]*>)")


def _alternatives(tok: str) -> list[str]:
    m = re.fullmatch(r"\{([^{}]+,[^{}]+)\}", tok)
    if m:
        return m.group(1).split(",")
    if "|" in tok and "=" not in tok and not tok.startswith("-"):
        return tok.split("|")
    return [tok]


def expand(args: list[str]) -> list[list[str]]:
    """Placeholders resolved (see the module docstring); one argument list per alternative."""
    out: list[list[str]] = []
    for k, tok in enumerate(args):
        after_option = k > 0 and args[k - 1].startswith("-") and "=" not in args[k - 1]
        if tok in ("...", "…", "key=value", "$@") and not after_option:
            continue
        if PLACEHOLDER.match(tok) and "=" not in tok:
            if tok == "CONFIG" or tok.endswith((".yaml", ".yml")):
                tok = PLACEHOLDER_CONFIG
            elif after_option:
                tok = "1"
        out.append(_alternatives(tok))
    combos = list(itertools.product(*out))
    return [list(c) for c in combos[:32]]


def _value_at(cfg: object, key: str) -> object:
    """The value at a dotted key (``a.b[1].c`` or ``a.b.1.c``) of a loaded config; KeyError if none."""
    node = cfg
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(key)
    return dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node


def _load(config: str | None, overrides: list[str], world_size: int | None) -> None:
    """load_config, placeholder values replaced by the value the config already has."""
    from pretrain.config import load_config

    concrete = [o for o in overrides if not PLACEHOLDER.match(o.partition("=")[2])]
    if len(concrete) < len(overrides):
        base = load_config(config, concrete, world_size=world_size)
        resolved = []
        for o in overrides:
            key, _, value = o.partition("=")
            if PLACEHOLDER.match(value):
                with contextlib.suppress(KeyError):  # an unknown key keeps its text: load_config names it
                    value = json.dumps(_value_at(base, key))
            resolved.append(f"{key}={value}")
        overrides = resolved
    load_config(config, overrides, world_size=world_size)


def check_command(package: str, args: list[str], inline: bool) -> str | None:
    """None when the arguments parse (and their config loads), else the error text."""
    import data_pipelines.__main__ as dp_main
    import pretrain.__main__ as pt_main
    from pretrain.errors import UserError

    parser = (pt_main if package == "pretrain" else dp_main).build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if package == "pretrain":
                ns = parser.parse_args(args)
                overrides = list(getattr(ns, "overrides", []))
            else:  # as data_pipelines.__main__.main: key=value may also follow options
                ns, extra = parser.parse_known_args(args)
                unknown = [a for a in extra if a.startswith("-") or "=" not in a]
                if unknown:
                    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
                overrides = [*getattr(ns, "overrides", []), *extra]
    except SystemExit as e:
        msg = err.getvalue().strip().splitlines()
        if e.code in (0, None):
            return None
        if inline and msg and "the following arguments are required" in msg[-1]:
            return None  # `python -m pretrain train` in prose names the command
        return msg[-1] if msg else f"exit status {e.code}"
    if not hasattr(ns, "config"):
        return None
    config = ns.config
    loadable = config is None and package == "data_pipelines" or config is not None and (ROOT / config).is_file()
    if not loadable:
        return None  # the user's own file (my_run.yaml): its overrides depend on it
    world_size = ns.gpus[0] if getattr(ns, "gpus", None) else None
    try:
        _load(None if config is None else str(ROOT / config), overrides, world_size)
    except UserError as e:
        return str(e)
    return None


def command_problems(path: Path, text: str) -> list[str]:
    problems = []
    for c in commands(Markdown.parse(text)):
        try:
            found = package_args(c.text)
        except ValueError as e:  # unbalanced quotes
            if re.search(r"-m\s+(?:pretrain|data_pipelines)\s", c.text):
                problems.append(f"{_rel(path)}:{c.line}: cannot split `{c.text}`: {e}")
            continue
        if found is None:
            continue
        package, args = found
        for variant in expand(args):
            error = check_command(package, variant, c.inline)
            where = f"{_rel(path)}:{c.line}: `{c.text}`"
            if c.expected_error is None and error is not None:
                problems.append(f"{where}: {' / '.join(x.strip() for x in error.splitlines())}")
            elif c.expected_error is not None and error is None:
                problems.append(f"{where}: documented to fail with {c.expected_error!r}, but it is accepted")
            elif (c.expected_error is not None and error is not None and not c.expected_error.startswith("usage:")
                  and error.splitlines()[0].strip() != c.expected_error):  # a usage line is argparse's: any error will do
                problems.append(f"{where}: documented error {c.expected_error!r}, actual {error.splitlines()[0]!r}")
    return problems


# --------------------------------------------------------------------------------------------
# Checks 5 and 6: make targets, launch/ and configs/ paths
# --------------------------------------------------------------------------------------------


def make_targets(text: str) -> list[tuple[int, str]]:
    """(line, target) for every `make TARGET ...` in fenced code or an inline code span."""
    out = []
    for c in commands(Markdown.parse(text)):
        try:
            toks = _strip_env(_tokens(c.text))
        except ValueError:
            continue
        if not toks or toks[0] != "make":
            continue
        out += [(c.line, t) for t in toks[1:] if not t.startswith("-") and not ENV_ASSIGN.match(t)]
    return out


def make_problems(path: Path, text: str) -> list[str]:
    problems = []
    for line, target in make_targets(text):
        r = subprocess.run(["make", "-n", "--no-print-directory", target], cwd=ROOT, capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            problems.append(f"{_rel(path)}:{line}: `make {target}`: {r.stderr.strip().splitlines()[-1:]}")
    return problems


REPO_PATH = re.compile(r"(?<![\w./~-])((?:launch|configs)/[\w./*{},-]*[\w*}])")


def path_problems(path: Path, text: str) -> list[str]:
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in REPO_PATH.finditer(line):
            p = m.group(1)
            name = p.split("/")[-1]
            if re.search(r"[*{}]|\.\.\.", p) or PLACEHOLDER.match(name) or name.startswith(("my_", "my-")):
                continue  # a glob, a placeholder, or the reader's own file (configs/my_run.yaml)
            if not (ROOT / p).exists():
                problems.append(f"{_rel(path)}:{n}: {p} does not exist")
    return problems


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------

FILES = pytest.mark.parametrize("md", MARKDOWN, ids=_rel)


def _fail(problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{len(problems)} problem(s):\n" + "\n".join(problems), pytrace=False)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move details to docs/"


@FILES
def test_relative_links_resolve(md):
    _fail(link_problems(md, md.read_text(encoding="utf-8")))


@FILES
def test_no_issue_tracker_references(md):
    _fail(issue_problems(md, md.read_text(encoding="utf-8")))


@FILES
def test_documented_commands_parse(md):
    _fail(command_problems(md, md.read_text(encoding="utf-8")))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@FILES
def test_make_targets_exist(md):
    _fail(make_problems(md, md.read_text(encoding="utf-8")))


@FILES
def test_launch_and_config_paths_exist(md):
    _fail(path_problems(md, md.read_text(encoding="utf-8")))


def test_the_checks_catch_mistakes(tmp_path):
    """Each check, on a file with one mistake of its kind, reports it (and passes the correct twin)."""
    (tmp_path / "other.md").write_text("# Other `page`: notes\n\n## What may change?\n")
    doc = tmp_path / "doc.md"
    good = ("# Title\n\nSee [other](other.md#other-page-notes), [again](other.md#what-may-change) and [up](#title),\n"
            "the [site](https://example.org/x#y) and upstream DeepSpeed issue 1234.\n\n"
            "```bash\npython -m pretrain train configs/demo.yaml model.n_layers=3 \\\n    train.max_steps=5\n"
            "DS_ACCELERATOR=cpu python -m data_pipelines bench {pii,scrub} [--config CONFIG.yaml] [key=value ...]\n"
            "make demo\n```\n\n"
            "```\n$ python -m pretrain train configs/demo.yaml model.n_layerz=3\n"
            "config error: unknown key 'model.n_layerz' (command-line override); did you mean 'model.n_layers'?\n```\n\n"
            "Run `python -m pretrain train` with `configs/demo.yaml` or launch/torchrun.sh.\n")
    assert link_problems(doc, good) == []
    assert issue_problems(doc, good) == []
    assert command_problems(doc, good) == []
    assert make_problems(doc, good) == []
    assert path_problems(doc, good) == []

    assert len(link_problems(doc, "[x](missing.md) [y](other.md#nope) [z](#nowhere)\n")) == 3
    assert len(issue_problems(doc, "Fixed in issue 23.\nSee #12.\nSee issues #4 and 5.\n")) == 3
    assert len(command_problems(doc, "```\npython -m pretrain train configs/demo.yaml model.n_layerz=3\n```\n")) == 1
    assert len(command_problems(doc, "```\npython -m pretrain trian CONFIG.yaml\n```\n")) == 1
    assert len(command_problems(doc, "`python -m data_pipelines scrub CONFIG.yaml scrub.wrkers=2`\n")) == 1
    assert len(command_problems(doc, "```\npython -m pretrain export --checkpoint DIR \\\n  --outt DIR\n```\n")) == 1
    assert len(command_problems(doc, "```\npython -m pretrain plan CONFIG.yaml --gpus 1,x\n```\n")) == 1
    assert len(command_problems(doc, "```\npython -m pretrain train configs/demo.yaml run.name=a#b model.n_layerz=1\n```\n")) == 1
    assert len(command_problems(doc, "```\n$ python -m pretrain train configs/demo.yaml\nconfig error: x\n```\n")) == 1
    assert len(make_problems(doc, "`make no-such-target`\n")) == 1
    assert len(path_problems(doc, "Edit configs/nothing.yaml and launch/none.sh.\n")) == 2
    assert github_slug("The `scrub.canaries` keys: [a link](x.md) & more_things!") == "the-scrubcanaries-keys-a-link--more_things"
