"""Starting a submission's worker process in a sandbox, and ending it with everything it started.

Three levels, the strongest this machine allows (:func:`detect`, decided once per grader process):

``bwrap`` (Linux with bubblewrap, run as root)
    The worker sees a new, empty root: the system's ``/usr`` (and ``/bin``, ``/lib``), the Python
    installation and its site-packages, and the ``icl_course`` package, all read-only; a private
    ``/tmp`` of limited size as its working folder; its own ``/proc``. Nothing else: no course
    repository (no solutions), no home folders, no other submission, none of the grader's files.
    New network (no interface but a down loopback), PID, IPC and UTS namespaces; it runs as an
    unprivileged user of its own (a uid from ``UIDS``, one per worker alive), with no capabilities.
    Killing it kills its PID namespace, so every process it started, ``setsid`` or not, dies too.
``unshare`` (Linux, root, no usable bubblewrap)
    New network, PID, IPC and UTS namespaces through util-linux's ``unshare``, and the worker's own
    unprivileged uid when the Python installation is readable by other users (otherwise root
    without capabilities). The file system is *not* hidden: what other users may read, it reads.
``none`` (anything else)
    Only the limits below and a process group. The worker runs as the grader's user.

Always: limits on address space and processes (rlimits; also a memory and pids cgroup where
``/sys/fs/cgroup`` lets us make one), CPU seconds, file size and open files; an environment with
nothing of the grader's but ``PATH``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import icl_course

UIDS = range(61_000, 62_000)  # unprivileged uids the workers run as (root only); one per live worker
LOCKS = Path("/tmp/.icl-course-grader-uids")  # a root-only folder of lock files, one per uid in use
PACKAGE_MOUNT = "/opt/icl-course"  # where the sandbox sees the package's parent folder


@dataclass(frozen=True)
class Limits:
    memory: int = 2 * 2**30  # bytes: each process's address space beyond torch's own, and a cgroup's total
    processes: int = 64  # processes and threads of the worker's uid (or cgroup)
    disk: int = 64 * 2**20  # bytes: the private /tmp, and any one file written (RLIMIT_FSIZE)
    cpu: int = 600  # CPU seconds of each process
    files: int = 256  # open file descriptors


_LEVEL: str | None = None
_WARNED = False


def detect() -> str:
    """``"bwrap"``, ``"unshare"`` or ``"none"``: see the module docstring (probed once)."""
    global _LEVEL
    if _LEVEL is None:
        forced = os.environ.get("ICL_COURSE_SANDBOX")  # tests force the fallbacks with it
        order = [forced] if forced else ["bwrap", "unshare", "none"]
        _LEVEL = next(level for level in order if level == "none" or _works(level))
    return _LEVEL


def explain(level: str) -> str | None:
    """One plain sentence for the instructor when the sandbox is weaker than ``bwrap``, else None."""
    if level == "bwrap":
        return None
    if level == "unshare":
        return ("icl-course grade: bubblewrap is not available, so submissions run without a private file "
                "system: they have no network and their own process namespace, but can read what other users "
                "can (your clone's solutions too), and write root's files if this Python is not readable by "
                "other users. Install bubblewrap (apt-get install bubblewrap) for the full sandbox.")
    return ("icl-course grade: no sandbox on this machine (it needs Linux, bubblewrap and root): submissions "
            "run as you, limited only in time, memory, processes and file size, and can read and write your "
            "files and use the network. Grade on a machine with bubblewrap, as root, or in a throwaway container.")


def warn_once(stream=None) -> None:
    global _WARNED
    message = explain(detect())
    if message and not _WARNED:
        print(message, file=stream or sys.stderr)
        _WARNED = True


def _works(level: str) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    if level == "bwrap" and not shutil.which("bwrap"):
        return False
    if level == "unshare" and not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    try:
        with Worker([sys.executable, "-S", "-c", "pass"], Limits(), level=level) as w:
            return w.proc.wait(timeout=30) == 0
    except (OSError, subprocess.SubprocessError):
        return False


# --- uids ---------------------------------------------------------------------------------------------


def _lock_uid():
    """``(uid, lock file)``: a uid of ``UIDS`` that no other live worker holds (root only)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(LOCKS, 0o700)
    st = os.lstat(LOCKS)
    if st.st_uid != 0 or st.st_mode & 0o077 or not os.path.isdir(LOCKS) or os.path.islink(LOCKS):
        raise OSError(f"{LOCKS} is not a root-only folder")
    start = os.getpid() % len(UIDS)
    for k in range(len(UIDS)):
        uid = UIDS[(start + k) % len(UIDS)]
        f = open(LOCKS / str(uid), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        return uid, f
    raise OSError("every grading uid is in use")


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process of ``uid`` until none is left (a fork bomb refills while we kill)."""
    for _ in range(100):
        found = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid:
                    continue
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):  # dead, not yet reaped
                        continue
                found = True
                os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, IndexError):  # gone meanwhile
                pass
        if not found:
            return
        time.sleep(0.01)


@functools.lru_cache(maxsize=1)
def _mapped_by_torch() -> int:
    """Bytes of address space a fresh interpreter maps once it has imported torch and the package, as
    the worker does (measured once): a CUDA build of torch maps about 3 GB just by being imported, a
    CPU build about 0.6 GB, so the worker's address-space limit is this much on top of its budget."""
    probe = ("import torch, icl_course\n"
             "print(next(l for l in open('/proc/self/status') if l.startswith('VmSize:')).split()[1])")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        return int(out.stdout.split()[-1]) * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 4 * 2**30  # could not measure: room for a CUDA build


# --- cgroups (v1 memory and pids controllers, where they can be made) ------------------------------------


class _Cgroup:
    def __init__(self, limits: Limits):
        self.dirs: list[Path] = []
        name = f"icl-grade-{os.getpid()}-{time.monotonic_ns()}"
        for controller, settings in (("memory", {"memory.limit_in_bytes": limits.memory + 2**28}),
                                     ("pids", {"pids.max": limits.processes})):
            base = Path("/sys/fs/cgroup") / controller
            try:
                own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                           if line.split(":", 2)[1] == controller)
                folder = base / own.lstrip("/") / name
                folder.mkdir()
            except (OSError, StopIteration, IndexError):
                continue
            try:
                for key, value in settings.items():
                    (folder / key).write_text(str(value))
            except OSError:
                folder.rmdir()
                continue
            self.dirs.append(folder)

    def join(self) -> None:  # in the child, before exec
        for folder in self.dirs:
            with open(folder / "cgroup.procs", "w") as f:
                f.write("0")

    def oom(self) -> bool:
        for folder in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                if folder.name and (folder / "memory.failcnt").exists() and int((folder / "memory.failcnt").read_text()) > 0:
                    return True
        return False

    def close(self) -> None:
        for folder in self.dirs:
            for _ in range(100):
                try:
                    pids = [int(p) for p in (folder / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    folder.rmdir()
                    break
                except OSError:
                    time.sleep(0.01)


# --- the worker process --------------------------------------------------------------------------------


def _env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home, "TMPDIR": home, "MPLCONFIGDIR": home, "MPLBACKEND": "Agg",
        "ICL_COURSE_PROFILE": "smoke", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8",
    }


def _python_roots() -> list[str]:
    """Folders the worker's Python needs: the installation, the environment, and site-packages."""
    roots = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    import torch

    for module in (torch,):
        roots.add(os.path.realpath(Path(module.__file__).parents[1]))
    roots.add(os.path.dirname(os.path.realpath(sys.executable)))
    out = []
    for root in sorted(roots):  # drop those inside another
        if not any(root.startswith(o + os.sep) for o in out):
            out.append(root)
    return out


def _bwrap(command: list[str], uid: int, limits: Limits) -> list[str]:
    args = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session"]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/nsswitch.conf"):
        args += ["--ro-bind-try", path, path]
    package = Path(icl_course.__file__).resolve().parent
    made = set()
    for source, dest in [*((root, root) for root in _python_roots()), (str(package), f"{PACKAGE_MOUNT}/icl_course")]:
        for parent in reversed(Path(dest).parents[:-1]):  # bwrap would make them root-only
            if parent not in made:
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        args += ["--ro-bind", source, dest]
    args += [
             "--proc", "/proc", "--dev", "/dev",
             "--size", str(limits.disk), "--perms", "1777", "--tmpfs", "/tmp", "--chdir", "/tmp",
             "--setenv", "PYTHONPATH", PACKAGE_MOUNT,
             "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"]
    return args + _drop(uid) + command


def _drop(uid: int | None) -> list[str]:
    if uid is None:  # root without capabilities
        return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


def _readable_by_others(paths) -> bool:
    for path in paths:
        p = Path(path)
        for folder in [p, *p.parents]:
            if not (os.stat(folder).st_mode & 0o005 == 0o005):
                return False
    return True


class Worker:
    """A sandboxed process running ``command``, with ``pass_fds`` inherited; a context manager that
    ends it and every process it started. ``returncode`` and ``oom`` tell how it ended."""

    def __init__(self, command: list[str], limits: Limits, level: str | None = None, pass_fds=(), stdout=None):
        self.level = level or detect()
        self.limits = limits
        self.uid, self._lock = None, None
        self.cgroup, self._home, self.proc = None, None, None
        try:
            self._start(command, limits, tuple(pass_fds), stdout)
        except BaseException:
            self.kill()
            raise

    def _start(self, command, limits, pass_fds, stdout) -> None:
        root = os.geteuid() == 0 and sys.platform == "linux"
        if root:
            self.uid, self._lock = _lock_uid()
            self.cgroup = _Cgroup(limits)
        env = _env("/tmp")
        if self.level == "bwrap":
            argv = _bwrap(command, self.uid, limits)
            cwd = "/"
        elif self.level == "unshare":
            self._home = tempfile.mkdtemp(prefix="icl-worker-")
            if self.uid is not None and _readable_by_others([*_python_roots(), Path(icl_course.__file__).parent]):
                os.chown(self._home, self.uid, self.uid)
                drop = _drop(self.uid)
            else:  # the worker's uid could not start this Python: root, without capabilities
                drop = _drop(None)
            argv = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts",
                    "--mount", "--propagation", "private", "--", *drop, *command]
            env = {**_env(self._home), "PYTHONPATH": str(Path(icl_course.__file__).resolve().parents[1])}
            cwd = self._home
        else:
            self._home = tempfile.mkdtemp(prefix="icl-worker-")
            env = {**_env(self._home), "PYTHONPATH": str(Path(icl_course.__file__).resolve().parents[1])}
            argv, cwd = command, self._home
        cgroup = self.cgroup
        address_space = limits.memory + _mapped_by_torch()

        def preexec():
            os.umask(0o022)  # the folders bwrap makes for its mount points must be readable
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    cgroup.join()
            for rlimit, value in ((resource.RLIMIT_AS, address_space), (resource.RLIMIT_CPU, limits.cpu),
                                  (resource.RLIMIT_FSIZE, limits.disk), (resource.RLIMIT_NOFILE, limits.files),
                                  (resource.RLIMIT_CORE, 0)):
                resource.setrlimit(rlimit, (value, value))
            if not root:  # the grader's own user: room for what runs now (roughly) and for the worker
                soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
                mine = sum(1 for _ in os.scandir("/proc")) if os.path.isdir("/proc") else 0
                cap = min(hard, mine + limits.processes) if hard != resource.RLIM_INFINITY else mine + limits.processes
                with contextlib.suppress(ValueError, OSError):
                    resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))
            else:
                resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))

        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if stdout else subprocess.DEVNULL, pass_fds=pass_fds,
            start_new_session=True, preexec_fn=preexec,
        )

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def oom(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom()

    def kill(self) -> None:
        """End the worker and everything it started; idempotent."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
        if self.uid is not None:
            _kill_uid(self.uid)
        if self.cgroup is not None:
            self.cgroup.close()
            self.cgroup = None
        if self._home:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
