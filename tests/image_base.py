"""The base of tests/test_image.py's image and the index its build installs from, made on the
host: a Debian `SUITE` root by `debootstrap --variant=minbase` (about a minute, mostly the
archive's downloads and dpkg) and the project's dependencies as wheels. Neither needs dockerd,
so `prepare` starts both on a thread of their own when the session begins (conftest.py, when
test_image.py is among the tests collected), and the image's fixture takes what they made
(or raises what failed) when the first test asks for the image.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from dockerd import unmount_under

PROJECT = Path(__file__).resolve().parent.parent

#: The base: Debian bookworm, whose python3 is 3.11 as python:3.11-slim's is.
SUITE, PYTHON_VERSION = "bookworm", "3.11"
BASE_PACKAGES = ("python3", "python3-venv")
#: What a Debian image needs no copy of (vfs copies the whole root for every container).
BASE_PRUNE = (
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/*.bin",
    "var/lib/apt/lists/*",
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/locale/*",
)
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_ARCHIVE = "http://deb.debian.org/debian"


def tool(name: str) -> str | None:
    """`name` on PATH, or in the sbin directories a non-login root shell may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


#: What run_logged runs now (on any thread): killed when the session ends under them.
RUNNING: set[subprocess.Popen[bytes]] = set()


def kill_session(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def run_logged(cmd: list[str], log: Path, timeout: float) -> None:
    """Run `cmd` in a session of its own with its output in `log`; kill the whole session if
    it outlives `timeout` (or the test is interrupted); fail with the log's tail if it fails."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    RUNNING.add(proc)
    try:
        code = proc.wait(timeout=timeout)
    except BaseException:
        kill_session(proc)
        raise
    finally:
        RUNNING.discard(proc)
    assert code == 0, f"{shlex.join(cmd)} exited with {code}:\n{tail(log)}"


# -- the base image ----------------------------------------------------------------------------


def debian_archive() -> str:
    """The Debian archive this machine's apt uses for `SUITE` (deb822 `*.sources` or one-line
    `*.list`), else deb.debian.org."""
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    key, colon, value = line.partition(":")
                    if colon and not line.startswith(("#", " ", "\t")):
                        fields[key.strip().lower()] = value.split()
                uris = [u for u in fields.get("uris", []) if u.startswith(("http://", "https://"))]
                if (
                    "deb" in fields.get("types", [])
                    and SUITE in fields.get("suites", [])
                    and fields.get("enabled", ["yes"]) != ["no"]
                    and uris
                ):
                    return uris[0]
        elif path.name == "sources.list" or path.suffix == ".list":
            for line in text.splitlines():
                found = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(https?://\S+)\s+(\S+)", line.strip())
                if found and found.group(2) == SUITE:
                    return found.group(1)
    return DEFAULT_ARCHIVE


def debootstrap(target: Path, log: Path) -> None:
    """A minimal Debian `SUITE` root with `BASE_PACKAGES` at `target`, checked against the
    Debian archive keyring, without what an image needs no copy of."""
    debootstrap = tool("debootstrap")
    assert debootstrap is not None
    run_logged(
        [
            debootstrap,
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            f"--keyring={KEYRING}",
            SUITE,
            str(target),
            debian_archive(),
        ],
        log,
        timeout=600,
    )
    for pattern in BASE_PRUNE:
        for path in target.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def remove_root(root: Path) -> None:
    """Remove a debootstrapped root: first whatever debootstrap left mounted in it (it mounts
    /proc and /sys there, and may bind /dev), and never while anything is still mounted."""
    unmount_under(root)
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    left = [m.split()[4] for m in mounts if m.split()[4].startswith(f"{root}/")]
    assert not left, f"still mounted under {root}, not removed: {left}"
    shutil.rmtree(root, ignore_errors=True)


# -- the package index the build installs from ------------------------------------------------


def normalized(project: str) -> str:
    """A project's name as a simple index spells its directory (PEP 503)."""
    return re.sub(r"[-_.]+", "-", project).lower()


def requirement_name(requirement: str) -> str:
    found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert found, requirement
    return normalized(found.group(0))


def dependencies() -> list[str]:
    """What `pip install .` needs from an index: the build backend and the project's
    dependencies."""
    meta = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    return [*meta["build-system"]["requires"], *meta["project"]["dependencies"]]


def wheelhouse(work: Path, log: Path) -> Path:
    """`dependencies()` as wheels for the base's Python, downloaded by the host's pip (nothing
    cached outside `work`), laid out as a simple index: a directory per project, whose
    listing (as http.server serves it) is the project's page."""
    wheels = work / "wheels"
    run_logged(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--python-version",
            PYTHON_VERSION,
            "--dest",
            str(wheels),
            *dependencies(),
            "wheel",  # what setuptools before 70.1 asks for to build a wheel
            # what redis needs below Python 3.11.3 (bookworm's is 3.11.2): pip decides a
            # dependency's markers by the host's own interpreter, not by --python-version
            "async-timeout>=4.0.3",
        ],
        log,
        timeout=300,
    )
    index = work / "index"
    for wheel in sorted(wheels.glob("*.whl")):
        project = index / normalized(wheel.name.split("-")[0])
        project.mkdir(parents=True, exist_ok=True)
        wheel.rename(project / wheel.name)
    return index


# -- made at the session's start -----------------------------------------------------------


@dataclass
class Base:
    """What `prepare` made under `work`: the debootstrapped root, the index, and the seconds
    debootstrap took."""

    work: Path
    root: Path
    index: Path
    debootstrap_seconds: float


class Preparation:
    """`debootstrap` and `wheelhouse` into `work`, on a thread of their own."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._base: Base | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="image-base", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            root = self.work / "root"
            started = time.monotonic()
            debootstrap(root, self.work / "debootstrap.log")
            seconds = time.monotonic() - started
            index = wheelhouse(self.work / "wheelhouse", self.work / "pip.log")
            self._base = Base(self.work, root, index, seconds)
        except BaseException as e:  # raised again where the base is asked for
            self._error = e

    def result(self, timeout: float) -> Base:
        """The base once made (waiting up to `timeout`), or what failed making it, raised."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the image base was not made within {timeout:.0f}s")
        if self._error is not None:
            raise self._error
        assert self._base is not None
        return self._base

    def close(self) -> None:
        """At the session's end: stop what still runs (a session cut short), then remove
        what was made."""
        for proc in list(RUNNING):
            kill_session(proc)
        self._thread.join(timeout=60)
        remove_root(self.work / "root")
        shutil.rmtree(self.work, ignore_errors=True)


#: The session's preparation, when test_image.py runs (set by conftest.py).
PREPARED: list[Preparation] = []


def ready_tools() -> bool:
    """Whether what `prepare` runs is here (else the fixture fails naming what is missing)."""
    return os.geteuid() == 0 and tool("debootstrap") is not None and KEYRING.is_file()
