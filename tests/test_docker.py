"""Static checks of the Docker images (docker/Dockerfile, docker/Dockerfile.cpu) and .dockerignore.

No Docker engine is needed: a small Dockerfile parser (line continuations, comments, parser
directives, exec/shell forms, ARG/ENV substitution) replays the instructions against a model of
the image's files (COPY sources mapped from the build context minus .dockerignore, ``rm -rf``
removing them) and checks what ``docker run IMAGE task=pusht sampler=paradigms`` relies on:
every COPY source is in the context, the package is pip-installed (non-editable, with existing
extras) from the copied repository, torch is installed first with the README's pin inside
pyproject's range (CPU wheel index for the CPU image, CUDA build for the GPU image), the
ENTRYPOINT runs eval.py with Hydra's ``configs`` beside it, the CMD overrides exist, WORKDIR
is /workspace, WANDB_MODE is offline and the user is not root. Mutated copies of the real
files must produce problems, so these checks can fail.
"""

from __future__ import annotations

import ast
import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cuda": ROOT / "docker" / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
DOCKERIGNORE = ROOT / ".dockerignore"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
UBUNTU_PYTHON = {"20.04": (3, 8), "22.04": (3, 10), "24.04": (3, 12)}  # python3 of each Ubuntu release
SHIPPED_ASSET = "para_policy/assets/pusht_lowdim.safetensors"


# --------------------------------------------------------------------------- Dockerfile parser


@dataclass
class Instruction:
    """One Dockerfile instruction: upper-case keyword, argument text (continuations joined), first line."""

    cmd: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form's list of strings, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Parse Dockerfile text into instructions.

    Handles parser directives (``# escape=`` changes the continuation character), comment lines
    (also inside a continued instruction, where Docker drops them), blank lines and lines ending
    with the escape character, which continue the instruction on the next line.
    """
    lines = text.splitlines()
    escape = "\\"
    i = 0
    while i < len(lines):  # parser directives: only at the very top, "# key=value"
        m = re.match(r"^#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$", lines[i])
        if not m:
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
        i += 1
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for n in range(i, len(lines)):
        raw = lines[n]
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = n + 1
        body = raw.rstrip()
        if body.endswith(escape):
            pending.append(body[: -len(escape)])
            continue
        pending.append(body)
        joined = " ".join(part.strip() for part in pending if part.strip())
        pending = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError(f"line {start}: the last instruction ends with a line continuation")
    return out


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand(text: str, env: dict[str, str]) -> str:
    """Substitute ``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``${VAR:+word}`` as Docker does."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        value = env.get(name, "")
        if m.group(2) == "-":
            return value or m.group(3)
        if m.group(2) == "+":
            return m.group(3) if value else ""
        return value

    return _VAR.sub(repl, text)


def parse_assignments(args: str) -> dict[str, str]:
    """``ENV``/``LABEL`` arguments: ``k=v k2="v 2"`` pairs, or the legacy ``ENV key value`` form."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


# --------------------------------------------------------------------------- .dockerignore


def _glob_regex(pattern: str) -> re.Pattern:
    """Docker's (moby patternmatcher) pattern syntax as a regex: ``**``, ``*``, ``?``, ``[...]``, ``\\``."""
    out, i = "^", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out += re.escape(c)
            else:
                out, i = out + pattern[i : end + 1], end
        elif c == "\\" and i + 1 < len(pattern):
            out, i = out + re.escape(pattern[i + 1]), i + 1
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


class DockerIgnore:
    """The exclusion rules of a .dockerignore: the last matching pattern wins, ``!`` re-includes,
    and a path is excluded when it or one of its parent folders matches."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = posixpath.normpath(line[1:].strip() if include else line)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
            self.rules.append((include, _glob_regex(pattern)))

    def excluded(self, rel: str) -> bool:
        """Whether ``rel`` (a path relative to the build context, '/'-separated) is left out."""
        parts = posixpath.normpath(rel).split("/")
        candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        result = False
        for include, rx in self.rules:
            if any(rx.match(c) for c in candidates):
                result = not include
        return result


# --------------------------------------------------------------------------- image model


@dataclass
class ImageFiles:
    """Which build-context path (if any) each image path holds, replayed from COPY and ``rm``."""

    root: Path
    ignore: DockerIgnore
    events: list[tuple[str, str, Path | None]] = field(default_factory=list)

    def copy(self, dest: str, src: Path) -> None:
        """``dest`` now holds ``src`` (a file, or a folder's contents)."""
        self.events.append(("map", posixpath.normpath(dest), src))

    def remove(self, path: str) -> None:
        """``rm -rf path``."""
        self.events.append(("rm", posixpath.normpath(path), None))

    def lookup(self, path: str, at: int | None = None) -> Path | None:
        """The build-context file or folder at image path ``path`` (after the first ``at`` events), or None."""
        path = posixpath.normpath(path)
        for kind, where, src in reversed(self.events[:at]):
            if not (path == where or path.startswith(where.rstrip("/") + "/")):
                continue
            if kind == "rm":
                return None
            candidate = src / posixpath.relpath(path, where) if path != where else src
            if candidate.exists() and not self.ignore.excluded(candidate.relative_to(self.root).as_posix()):
                return candidate
        return None


PIP_OPTIONS_WITH_VALUE = {
    "-i", "--index-url", "--extra-index-url", "-r", "--requirement", "-c", "--constraint", "-f",
    "--find-links", "-t", "--target", "--prefix", "--root", "--platform", "--python-version",
    "--only-binary", "--no-binary", "--upgrade-strategy", "--progress-bar", "--cache-dir", "-C",
    "--config-settings", "--src", "--implementation", "--abi", "--report", "--trusted-host",
}


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell script (split on ``&&``, ``||``, ``;``, ``|``, parentheses),
    with redirections dropped."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands, current, skip = [], [], False
    for tok in lex:
        if skip:
            skip = False
        elif tok in {"&&", "||", ";", "|", "(", ")", "&"}:
            if current:
                commands.append(current)
            current = []
        elif set(tok) <= set("<>&"):
            skip = True
        else:
            current.append(tok)
    if current:
        commands.append(current)
    return commands


def pip_install_args(words: list[str]) -> list[str] | None:
    """The arguments after ``pip install`` (also ``pip3``, ``python -m pip``), or None."""
    for i, word in enumerate(words):
        name = posixpath.basename(word)
        if name in {"pip", "pip3"} and words[i + 1 : i + 2] == ["install"]:
            return words[i + 2 :]
        if name.startswith("python") and words[i + 1 : i + 4] == ["-m", "pip", "install"]:
            return words[i + 4 :]
    return None


@dataclass
class PipInstall:
    """One ``pip install``: its requirement arguments, options and the instruction's line."""

    targets: list[str]
    options: list[str]
    editable: list[str]
    line: int
    cwd: str


def split_pip_args(args: list[str], line: int, cwd: str) -> PipInstall:
    """Separate requirement arguments from options (and from the values of options that take one)."""
    targets, options, editable = [], [], []
    it = iter(args)
    for arg in it:
        if arg in {"-e", "--editable"}:
            editable.append(next(it, ""))
        elif arg.startswith("--editable="):
            editable.append(arg.split("=", 1)[1])
        elif arg in PIP_OPTIONS_WITH_VALUE:
            options += [arg, next(it, "")]
        elif arg.startswith("-"):
            options.append(arg)
        else:
            targets.append(arg)
    return PipInstall(targets, options, editable, line, cwd)


def split_extras(target: str) -> tuple[str, list[str]]:
    """``path[extra1,extra2]`` -> (path, [extras])."""
    m = re.match(r"^(.*?)\[([^\]]*)\]$", target)
    if not m:
        return target, []
    return m.group(1), [e.strip() for e in m.group(2).split(",") if e.strip()]


def is_local_path(target: str) -> bool:
    """A pip argument naming a folder rather than a requirement (``.``, ``/x``, ``./x``)."""
    return target in {".", ".."} or target.startswith(("/", "./", "../"))


@dataclass
class Build:
    """The outcome of replaying a Dockerfile: base image, final state, pip installs, problems."""

    base: str = ""
    stages: int = 0
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = "root"
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    pip: list[PipInstall] = field(default_factory=list)
    # (install, folder, number of file events before it): a local folder pip-installed
    packages_installed_at: list[tuple[PipInstall, str, int]] = field(default_factory=list)
    files: ImageFiles | None = None
    problems: list[str] = field(default_factory=list)


def replay(text: str, root: Path, ignore: DockerIgnore) -> Build:
    """Replay a Dockerfile's instructions against the build context ``root``."""
    b = Build(files=ImageFiles(root, ignore))
    global_args: dict[str, str] = {}
    args: dict[str, str] = {}
    for ins in parse_dockerfile(text):
        scope = {**args, **b.env} if b.stages else global_args
        if ins.cmd == "ARG":
            name, eq, default = ins.args.partition("=")
            if b.stages:
                args[name.strip()] = expand(default.strip().strip('"'), scope) if eq else global_args.get(name, "")
            else:
                global_args[name.strip()] = default.strip().strip('"')
        elif ins.cmd == "FROM":
            b.stages += 1
            words = [w for w in expand(ins.args, global_args).split() if not w.startswith("--")]
            b.base = words[0] if words else ""
            args, b.env = {}, {}
        elif ins.cmd == "ENV":
            b.env.update({k: expand(v, scope) for k, v in parse_assignments(ins.args).items()})
        elif ins.cmd == "WORKDIR":
            b.workdir = posixpath.normpath(posixpath.join(b.workdir, expand(ins.args, scope)))
        elif ins.cmd == "USER":
            b.user = expand(ins.args, scope).split(":")[0]
        elif ins.cmd in {"ENTRYPOINT", "CMD"}:
            form = ins.exec_form()
            if form is None:
                b.problems.append(f"line {ins.line}: {ins.cmd} is not in exec (JSON) form; "
                                  "Hydra overrides after the image name would not reach eval.py")
            if ins.cmd == "ENTRYPOINT":
                b.entrypoint = form
            else:
                b.cmd = form
        elif ins.cmd in {"COPY", "ADD"}:
            replay_copy(ins, scope, b)
        elif ins.cmd == "RUN":
            replay_run(ins, scope, b)
    return b


def replay_copy(ins: Instruction, scope: dict[str, str], b: Build) -> None:
    """Map each COPY/ADD source from the build context to its image path; sources must be in the context."""
    words = ins.exec_form() or shlex.split(ins.args)
    flags = [w for w in words if w.startswith("--")]
    words = [expand(w, scope) for w in words if not w.startswith("--")]
    if any(f.startswith("--from") for f in flags) or len(words) < 2:
        return
    *sources, dest = words
    dest = posixpath.join(b.workdir, dest)
    into_folder = dest.endswith("/") or len(sources) > 1
    for src in sources:
        if ins.cmd == "ADD" and re.match(r"^[a-z]+://", src):
            continue
        rel = posixpath.normpath(src)
        path = b.files.root / rel
        if rel.startswith("..") or not path.exists():
            b.problems.append(f"line {ins.line}: {ins.cmd} source {src!r} is not in the repository")
            continue
        if b.files.ignore.excluded(rel):
            b.problems.append(f"line {ins.line}: {ins.cmd} source {src!r} is excluded by .dockerignore")
            continue
        if path.is_dir():
            b.files.copy(dest, path)  # a folder's contents, not the folder itself
        else:
            b.files.copy(posixpath.join(dest, path.name) if into_folder else dest, path)


def replay_run(ins: Instruction, scope: dict[str, str], b: Build) -> None:
    """Record ``pip install`` commands (and what a local folder target holds at that moment) and ``rm``."""
    cwd = b.workdir
    for words in shell_commands(expand(ins.args, scope)):
        if words[0] == "cd" and len(words) > 1:
            cwd = posixpath.join(cwd, words[1])
        elif words[0] == "rm":
            for target in (w for w in words[1:] if not w.startswith("-")):
                b.files.remove(posixpath.join(cwd, target))
        elif (pip_args := pip_install_args(words)) is not None:
            install = split_pip_args(pip_args, ins.line, cwd)
            b.pip.append(install)
            for target in install.targets + install.editable:
                folder, _ = split_extras(target)
                if is_local_path(folder):
                    b.packages_installed_at.append((install, posixpath.join(cwd, folder), len(b.files.events)))


# --------------------------------------------------------------------------- project facts


def pyproject() -> dict:
    """pyproject.toml's ``[project]`` table."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def package_files() -> list[Path]:
    """The package's source files and assets (no bytecode caches)."""
    return [f for f in sorted((ROOT / "para_policy").rglob("*"))
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]


def torch_range() -> SpecifierSet:
    """pyproject's torch specifier (e.g. ``>=2.1,<2.15``)."""
    for dep in pyproject()["dependencies"]:
        req = Requirement(dep)
        if req.name == "torch":
            return req.specifier
    raise AssertionError("pyproject.toml does not depend on torch")


def readme_torch_pin() -> SpecifierSet:
    """The torch pin of the README's install contract (its first ``pip install torch...``)."""
    m = re.search(r"pip install (torch[^\s&]*)", (ROOT / "README.md").read_text())
    assert m, "README.md has no `pip install torch...` step"
    return Requirement(m.group(1)).specifier


def hydra_entry(script: Path) -> tuple[str, str]:
    """(config_path, config_name) of the ``@hydra.main`` in ``script``."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "main":
            kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
            if "config_path" in kw:
                return kw["config_path"], kw["config_name"]
    raise AssertionError(f"{script} has no @hydra.main(config_path=..., config_name=...)")


def eval_config() -> dict:
    """configs/eval.yaml as plain YAML (interpolations left as strings)."""
    return yaml.safe_load((ROOT / "configs" / "eval.yaml").read_text())


# --------------------------------------------------------------------------- the checks


def base_problems(base: str, kind: str) -> list[str]:
    """CUDA base image for the GPU image (with a Python >= 3.10), a plain Python >= 3.10 one for the CPU image."""
    name, _, tag = base.partition(":")
    is_cuda = "cuda" in base.lower() or name.startswith("nvidia/") or name.startswith("nvcr.io/")
    if kind == "cuda":
        if not is_cuda:
            return [f"base image {base!r} is not a CUDA image"]
        if name.endswith("nvidia/cuda"):
            m = re.search(r"ubuntu(\d\d\.\d\d)", tag)
            if not m or UBUNTU_PYTHON.get(m.group(1), (0, 0)) < (3, 10):
                return [f"base image {base!r}: its Ubuntu's python3 is older than 3.10 (or unknown)"]
        return []
    if is_cuda:
        return [f"base image {base!r} of the CPU image is a CUDA image"]
    m = re.match(r"^(?:docker\.io/)?(?:library/)?python:3\.(\d+)", base)
    if not m or int(m.group(1)) < 10:
        return [f"base image {base!r} is not a python:3.10+ image"]
    return []


def pip_problems(b: Build, kind: str) -> list[str]:
    """torch installed first with the README's pin inside pyproject's range; the package installed
    non-editable, with existing extras, from a folder holding the copied repository."""
    problems = []
    torch_installs = []
    for install in b.pip:
        for target in install.targets:
            try:
                req = Requirement(target)
            except InvalidRequirement:
                continue
            if req.name == "torch":
                torch_installs.append((install, req))
    package_installs = [(i, p, at) for i, p, at in b.packages_installed_at
                        if b.files.lookup(posixpath.join(p, "pyproject.toml"), at) == ROOT / "pyproject.toml"]
    if not package_installs:
        problems.append("no `pip install <folder>` of a folder holding the repository's pyproject.toml")
    for install, folder, at in package_installs:
        for name in ("para_policy", pyproject()["readme"]):
            if b.files.lookup(posixpath.join(folder, name), at) != ROOT / name:
                problems.append(f"line {install.line}: {folder}/{name} is not the repository's {name} "
                                "when the package is installed")
        missing = [f.relative_to(ROOT).as_posix() for f in package_files()
                   if b.files.lookup(posixpath.join(folder, f.relative_to(ROOT).as_posix()), at) != f]
        if missing and b.files.lookup(posixpath.join(folder, "para_policy"), at) == ROOT / "para_policy":
            problems.append(f"line {install.line}: {missing[:3]} ({len(missing)} files) missing from the "
                            "copied package")
        if any(posixpath.join(install.cwd, split_extras(e)[0]) == folder for e in install.editable):
            problems.append(f"line {install.line}: the package is installed editable (-e); "
                            "the image wants `pip install .`")
        known = set(pyproject().get("optional-dependencies", {}))
        for target in install.targets:
            path, extras = split_extras(target)
            if posixpath.join(install.cwd, path) == folder and not set(extras) <= known:
                problems.append(f"line {install.line}: extras {sorted(set(extras) - known)} are not in "
                                f"pyproject's optional-dependencies {sorted(known)}")
    if not torch_installs:
        return problems + ["torch is not installed with its own `pip install torch==...` step"]
    install, req = torch_installs[0]
    pins = [Version(s.version) for s in req.specifier if s.operator == "=="]
    if not pins:
        problems.append(f"line {install.line}: torch is not pinned (`{req}`); the README pins it")
    for pin in pins:
        if pin not in torch_range():
            problems.append(f"line {install.line}: torch=={pin} is outside pyproject's torch{torch_range()}")
        if pin not in readme_torch_pin():
            problems.append(f"line {install.line}: torch=={pin} differs from the README's torch{readme_torch_pin()}")
    if package_installs and install.line > package_installs[0][0].line:
        problems.append(f"line {install.line}: torch is installed after the package (pip would pick its own torch)")
    index = [install.options[k + 1] for k, o in enumerate(install.options) if o in {"-i", "--index-url"}]
    index += [o.split("=", 1)[1] for o in install.options if o.startswith("--index-url=")]
    if kind == "cpu" and index != [CPU_INDEX]:
        problems.append(f"line {install.line}: the CPU image's torch should come from --index-url {CPU_INDEX}")
    if kind == "cuda" and any("cpu" in url for url in index):
        problems.append(f"line {install.line}: the CUDA image installs torch from a CPU index ({index})")
    return problems


def runtime_problems(b: Build) -> list[str]:
    """ENTRYPOINT runs eval.py with its Hydra configs beside it; CMD overrides exist; WORKDIR, WANDB_MODE, USER."""
    problems = []
    if not b.entrypoint or len(b.entrypoint) < 2 or not posixpath.basename(b.entrypoint[0]).startswith("python"):
        return problems + [f"ENTRYPOINT {b.entrypoint} is not ['python', '<path>/eval.py']"]
    script = b.entrypoint[1]
    if not script.startswith("/"):
        script = posixpath.join(b.workdir, script)
    source = b.files.lookup(script)
    if source != ROOT / "eval.py":
        problems.append(f"ENTRYPOINT script {script} is not the repository's eval.py in the image (found {source})")
    else:
        config_path, config_name = hydra_entry(source)
        config_dir = posixpath.join(posixpath.dirname(script), config_path)
        for rel in (f"{config_name}.yaml", "task/pusht.yaml", "sampler/paradigms.yaml"):
            if b.files.lookup(posixpath.join(config_dir, rel)) != ROOT / "configs" / rel:
                problems.append(f"Hydra looks for {config_dir}/{rel} (config_path={config_path!r} beside "
                                f"{script}); the image does not hold configs/{rel} there")
    config = eval_config()
    for override in b.cmd or []:
        key, eq, value = override.partition("=")
        if not eq:
            problems.append(f"CMD item {override!r} is not a Hydra override key=value")
        elif (ROOT / "configs" / key).is_dir():
            if not (ROOT / "configs" / key / f"{value}.yaml").exists():
                problems.append(f"CMD override {override!r}: no configs/{key}/{value}.yaml")
        elif key.split(".")[0] not in config:
            problems.append(f"CMD override {override!r}: eval.yaml has no key {key!r}")
    if b.workdir != "/workspace":
        problems.append(f"final WORKDIR is {b.workdir}, not /workspace")
    if b.env.get("WANDB_MODE") != "offline":
        problems.append(f"ENV WANDB_MODE is {b.env.get('WANDB_MODE')!r}, not 'offline'")
    if b.user in {"root", "0", ""}:
        problems.append(f"the image runs as {b.user or 'root'!r}; add a non-root USER")
    return problems


def dockerfile_problems(text: str, kind: str, ignore_text: str) -> list[str]:
    """Everything wrong with a Dockerfile of ``kind`` ('cuda' or 'cpu') for the evaluator."""
    b = replay(text, ROOT, DockerIgnore(ignore_text))
    problems = list(b.problems)
    if b.stages != 1:
        problems.append(f"{b.stages} FROM instructions: these checks model a single-stage build")
    return problems + base_problems(b.base, kind) + pip_problems(b, kind) + runtime_problems(b)


# --------------------------------------------------------------------------- tests


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python:3.11-slim\n"
        "FROM ${BASE}\n"
        "\n"
        "RUN apt-get update \\\n"
        "    # a comment inside the instruction\n"
        "    && apt-get install -y libgl1 \\\n"
        "    && echo done\n"
        'ENV A=1 B="two words"\n'
        'ENTRYPOINT ["python", "/opt/x/eval.py"]\n'
        "CMD task=pusht\n"
    )
    ins = parse_dockerfile(text)
    assert [i.cmd for i in ins] == ["ARG", "FROM", "RUN", "ENV", "ENTRYPOINT", "CMD"]
    assert ins[2].args == "apt-get update && apt-get install -y libgl1 && echo done"
    assert ins[2].line == 5
    assert parse_assignments(ins[3].args) == {"A": "1", "B": "two words"}
    assert ins[4].exec_form() == ["python", "/opt/x/eval.py"]
    assert ins[5].exec_form() is None
    assert expand("torch==${V} ${W:-x} $V", {"V": "2.13.0"}) == "torch==2.13.0 x 2.13.0"
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("RUN echo \\\n")


def test_parser_escape_directive() -> None:
    ins = parse_dockerfile("# escape=`\nFROM python:3.11-slim\nRUN echo a `\n    b\n")
    assert ins[1].args == "echo a b"


def test_shell_commands_and_pip_arguments() -> None:
    cmds = shell_commands('(userdel x 2>/dev/null || true) && pip install "/src[launchers]" && rm -rf /src')
    assert cmds == [["userdel", "x", "2"], ["true"], ["pip", "install", "/src[launchers]"], ["rm", "-rf", "/src"]]
    install = split_pip_args(["torch==2.13.0", "--index-url", CPU_INDEX, "-e", "."], 1, "/")
    assert install.targets == ["torch==2.13.0"] and install.editable == ["."]
    assert pip_install_args(["python3", "-m", "pip", "install", "."]) == ["."]


def test_dockerignore_matcher() -> None:
    ignore = DockerIgnore("outputs/\n**/__pycache__\n*.md\n!README.md\n/data\n")
    assert ignore.excluded("outputs/eval/x/results.json")
    assert ignore.excluded("para_policy/models/__pycache__/unet.cpython-311.pyc")
    assert ignore.excluded("NOTES.md") and not ignore.excluded("README.md")
    assert ignore.excluded("data/pusht/a.zarr")
    assert not ignore.excluded("para_policy/outputs.py")
    assert not ignore.excluded("docs/outputs/x")  # Docker patterns are anchored at the context root


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile(kind: str) -> None:
    problems = dockerfile_problems(DOCKERFILES[kind].read_text(), kind, DOCKERIGNORE.read_text())
    assert problems == []


def test_dockerignore_keeps_run_products_out_and_the_package_in() -> None:
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    for rel in ["outputs/eval/2026-01-01/x/results.json", "multirun/eval/x/0/results.json", "wandb/run-x/files",
                "data/pusht/pusht_expert.zarr/.zgroup", "runs/pusht_ship/checkpoints/latest.safetensors",
                ".git/HEAD", "para_policy/__pycache__/policy.cpython-311.pyc", "para_policy.egg-info/PKG-INFO",
                ".pytest_cache/v/cache/nodeids", ".ruff_cache/x"]:
        assert ignore.excluded(rel), rel
    for rel in ["pyproject.toml", "README.md", "eval.py", "train.py", "configs/eval.yaml", "configs/task/pusht.yaml",
                "para_policy/__init__.py", "para_policy/evaluation/runner.py", SHIPPED_ASSET]:
        assert not ignore.excluded(rel), rel


def test_shipped_checkpoint_is_package_data() -> None:
    """The default checkpoint resolves inside the installed package, so a non-editable install must ship it."""
    assert eval_config()["checkpoint"].startswith("${para_policy.asset:")
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "assets/*" in package_data["para_policy"]


def test_eval_config_fits_docker_run() -> None:
    """`docker run ... -v $PWD/outputs:/workspace/outputs IMAGE ... device=cuda` relies on these."""
    config = eval_config()
    assert not config["hydra"]["run"]["dir"].startswith("/")  # relative to WORKDIR /workspace
    assert config["hydra"]["run"]["dir"].startswith("outputs/")
    assert config["hydra"]["job"]["chdir"] is False
    assert "device" in config and "checkpoint" in config


MUTATIONS = [
    ("cuda", "COPY configs /opt/para_policy/configs", "COPY configs /opt/para_policy/", "Hydra looks for"),
    ("cuda", "WORKDIR /workspace", "WORKDIR /home/app", "WORKDIR"),
    ("cuda", "ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.15.0", "outside pyproject"),
    ("cuda", "ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0", "differs from the README"),
    ("cuda", "ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04", "ARG CUDA_IMAGE=ubuntu:24.04", "not a CUDA image"),
    ("cuda", "ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04", "ARG CUDA_IMAGE=nvidia/cuda:12.2.2-base-ubuntu20.04",
     "older than 3.10"),
    ("cuda", 'RUN pip install "torch==${TORCH_VERSION}"',
     f'RUN pip install "torch==${{TORCH_VERSION}}" --index-url {CPU_INDEX}', "CPU index"),
    ("cuda", "ARG EXTRAS=eval,launchers", "ARG EXTRAS=eval,launcher", "optional-dependencies"),
    ("cuda", "USER app", "USER root", "non-root"),
    ("cpu", "FROM python:3.11-slim-bookworm", "FROM nvidia/cuda:13.0.2-base-ubuntu24.04", "is a CUDA image"),
    ("cpu", 'pip install "/tmp/para_policy_src[${EXTRAS}]"', 'pip install -e "/tmp/para_policy_src[${EXTRAS}]"',
     "editable"),
    ("cpu", 'pip install "/tmp/para_policy_src[${EXTRAS}]" \\\n    && rm -rf /tmp/para_policy_src',
     'echo \\\n    && rm -rf /tmp/para_policy_src && pip install "/tmp/para_policy_src[${EXTRAS}]"', "pyproject.toml"),
    ("cpu", "COPY para_policy /tmp/para_policy_src/para_policy", "COPY para_policy /tmp/para_policy_src/",
     "para_policy is not the repository's"),
    ("cpu", "COPY eval.py train.py /opt/para_policy/", "COPY eval.py requirements.txt /opt/para_policy/",
     "not in the repository"),
    ("cpu", "--index-url \"${TORCH_INDEX_URL}\"", "", "--index-url"),
    ("cpu", "ENV WANDB_MODE=offline", "ENV WANDB_MODE=online", "WANDB_MODE"),
    ("cpu", 'ENTRYPOINT ["python", "/opt/para_policy/eval.py"]', "ENTRYPOINT python /opt/para_policy/eval.py",
     "exec (JSON) form"),
    ("cpu", 'ENTRYPOINT ["python", "/opt/para_policy/eval.py"]', 'ENTRYPOINT ["python", "/opt/para_policy/train.py"]',
     "not the repository's eval.py"),
    ("cpu", 'CMD ["task=pusht", "sampler=paradigms"]', 'CMD ["task=pusht", "sampler=paradigm"]',
     "no configs/sampler/paradigm.yaml"),
]


@pytest.mark.parametrize("kind, old, new, expected", MUTATIONS, ids=[f"{m[0]}:{m[3]}" for m in MUTATIONS])
def test_mutated_dockerfile_is_caught(kind: str, old: str, new: str, expected: str) -> None:
    text = DOCKERFILES[kind].read_text()
    assert text.count(old) == 1, f"mutation target {old!r} not found once in {DOCKERFILES[kind].name}"
    problems = dockerfile_problems(text.replace(old, new), kind, DOCKERIGNORE.read_text())
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("extra_rule, expected", [("configs", "excluded by .dockerignore"),
                                                  ("*.py", "excluded by .dockerignore"),
                                                  ("para_policy/evaluation", "missing from the copied package")])
def test_mutated_dockerignore_is_caught(extra_rule: str, expected: str) -> None:
    ignore_text = DOCKERIGNORE.read_text() + f"\n{extra_rule}\n"
    problems = dockerfile_problems(DOCKERFILES["cpu"].read_text(), "cpu", ignore_text)
    assert any(expected in p for p in problems), problems


def test_dockerignore_must_not_drop_shipped_policy() -> None:
    assert DockerIgnore(DOCKERIGNORE.read_text() + "\n**/*.safetensors\n").excluded(SHIPPED_ASSET)


def test_docker_readme() -> None:
    text = (ROOT / "docker" / "README.md").read_text()
    for needle in ["docker build -f docker/Dockerfile -t para_policy .", "docker/Dockerfile.cpu", "--gpus all",
                   "task=pusht sampler=paradigms", ":/workspace/outputs", "checkpoint=/ckpt/", "not built here"]:
        assert needle.lower() in text.lower(), needle
