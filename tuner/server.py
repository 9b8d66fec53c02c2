"""A managed ``ollama serve``: started, restarted on server-level changes, always stopped.

Server-level settings (flash attention, KV-cache type, parallel slots) live in the server's
environment, so trying another value means restarting the server. The tuner runs its own
server on a free port of 127.0.0.1, sharing the user's model store so nothing is
downloaded again, and makes sure it never outlives the tuner:

* ``stop()`` (also via ``with``, ``atexit`` and a chained SIGTERM handler) terminates the
  whole process group: ``ollama serve`` spawns runner children;
* on Linux the server gets SIGTERM from the kernel when the tuner dies, even by ``kill -9``
  (PR_SET_PDEATHSIG), and Ollama stops its runners on SIGTERM.

Version rules (from Ollama's release notes and source, envconfig and llm/server.go):

* before v0.12.5 flash attention has no "auto": unset means off;
* before v0.30 a quantized KV cache needs flash attention on, else the server silently
  runs f16. The environment passed is the *effective* value, so the server and the study's
  record agree even where "auto" would have left the outcome open.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from tuner.errors import LoadError, ServerSetupError, SpaceError
from tuner.settings import ENV_VARS, env_value, expected, normalise

#: Keep a model loaded between a trial's requests (Ollama's default unloads after 5 minutes):
#: the managed server's default, and what the Ollama engine sends with every request.
KEEP_ALIVE = "30m"
SYSTEM_MODELS_DIR = Path("/usr/share/ollama/.ollama/models")
STOP_TIMEOUT_S = 5.0
#: Parsed form of dev builds ("0.0.0") and unreadable versions: newer than any release.
NEWEST = (1 << 30, 0, 0)
_AUTO_FA_SINCE = (0, 12, 5)
_KV_WITHOUT_FA_SINCE = (0, 30, 0)
_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")
_PR_SET_PDEATHSIG = 1


# ----------------------------------------------------------------------------- versions


def parse_version(version: str | None) -> tuple[int, int, int]:
    """``"0.33.1"`` -> (0, 33, 1); pre-release suffixes are ignored ("0.6.5-rc1" -> (0, 6, 5)).

    Dev builds report "0.0.0"; they and unreadable versions count as newest (NEWEST).
    """
    m = _VERSION_RE.search(version or "")
    if m is None:
        return NEWEST
    parsed = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    return NEWEST if parsed == (0, 0, 0) else parsed


def has_auto_flash_attention(version: str | None) -> bool:
    """Whether OLLAMA_FLASH_ATTENTION unset means "auto" (v0.12.5+) rather than off."""
    return parse_version(version) >= _AUTO_FA_SINCE


def kv_needs_flash_attention(version: str | None) -> bool:
    """Whether a quantized KV cache silently falls back to f16 without flash attention (< v0.30)."""
    return parse_version(version) < _KV_WITHOUT_FA_SINCE


# ----------------------------------------------------------------------------- environment


def effective_settings(settings: Mapping[str, Any], version: str | None) -> dict[str, Any]:
    """The server-level settings a server of ``version`` really runs for ``settings``.

    Only the keys given are returned. "auto" flash attention is "off" before v0.12.5; a
    quantized KV cache is "f16" before v0.30 unless flash attention is "on" ("auto" counts
    as not on: the outcome would depend on the model and GPU).
    """
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in ENV_VARS:
            raise ServerSetupError(
                f"unknown server setting '{key}': use {', '.join(ENV_VARS)}"
            )
        try:
            v = normalise(key, value)
        except SpaceError:
            raise ServerSetupError(f"invalid {key} {value!r}: use {expected(key)}") from None
        if key == "flash_attention" and v == "auto" and not has_auto_flash_attention(version):
            v = "off"
        out[key] = v
    fa_on = out.get("flash_attention") == "on"
    if out.get("kv_cache_type", "f16") != "f16" and not fa_on and kv_needs_flash_attention(version):
        out["kv_cache_type"] = "f16"
    return out


def server_env(settings: Mapping[str, Any], version: str | None, base: Mapping[str, str]) -> dict[str, str]:
    """Environment for ``ollama serve``: ``base`` plus the effective settings.

    Settings not given run at Ollama's default: an OLLAMA_FLASH_ATTENTION etc. inherited from
    ``base`` is dropped, so what the study records is what ran. OLLAMA_HOST and OLLAMA_MODELS
    are the caller's to add.
    """
    env = {k: v for k, v in base.items() if k not in ENV_VARS.values()}
    for key, value in effective_settings(settings, version).items():
        text = env_value(key, value)
        if text is not None:
            env[ENV_VARS[key]] = text
    # A model unloaded or a second one resident between requests would disturb the timings.
    env["OLLAMA_KEEP_ALIVE"] = KEEP_ALIVE
    env["OLLAMA_MAX_LOADED_MODELS"] = "1"
    return env


def models_dir_for(models_dir: str | Path | None, env: Mapping[str, str]) -> Path:
    """The model store to share: ``models_dir``, else $OLLAMA_MODELS, else ~/.ollama/models.

    A system-service install (Linux install script) keeps its models in
    /usr/share/ollama/.ollama/models; that is used when it exists and the home one does not.
    """
    if models_dir:
        return Path(models_dir).expanduser()
    if env.get("OLLAMA_MODELS"):
        return Path(env["OLLAMA_MODELS"]).expanduser()
    home = Path("~/.ollama/models").expanduser()
    if not home.exists() and SYSTEM_MODELS_DIR.exists():
        return SYSTEM_MODELS_DIR
    return home


def find_ollama(binary: str | None) -> str:
    """Path of the ``ollama`` executable: ``binary`` (--ollama-bin), else ``ollama`` on PATH."""
    if binary:
        found = shutil.which(str(Path(binary).expanduser()))
        if found is None:
            raise ServerSetupError(
                f"--ollama-bin {binary} is not an executable file: pass the path of the `ollama` binary"
            )
        return os.path.abspath(found)
    found = shutil.which("ollama")
    if found is None:
        raise ServerSetupError("no `ollama` executable found: install Ollama or pass --ollama-bin PATH")
    return found


def binary_version(binary: str, env: Mapping[str, str] | None = None, timeout_s: float = 15) -> str | None:
    """The version ``binary --version`` reports (the client's, when no server answers), or None."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=timeout_s,
            env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    # "ollama version is X", or "Warning: client version is X" when no server is reachable.
    found = re.findall(r"version is\s+(v?\d[\w.+-]*)", out.stdout + out.stderr)
    return found[-1].lstrip("v") if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- cleanup hooks

_LIVE: weakref.WeakSet[ManagedServer] = weakref.WeakSet()
_hooks_lock = threading.Lock()
_atexit_registered = False
_sigterm_installed = False
_previous_sigterm: Any = None


def _stop_all() -> None:
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - cleanup must reach every server
            pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _stop_all()
    prev = _previous_sigterm
    if callable(prev):
        prev(signum, frame)
        return
    if prev == signal.SIG_IGN:
        return
    # Default disposition: die by the signal, as if this handler had never been there.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_hooks() -> None:
    global _atexit_registered, _sigterm_installed, _previous_sigterm
    with _hooks_lock:
        if not _atexit_registered:
            atexit.register(_stop_all)
            _atexit_registered = True
        if not _sigterm_installed and threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGTERM)
            if prev is not _on_sigterm:
                _previous_sigterm = prev
                signal.signal(signal.SIGTERM, _on_sigterm)
            _sigterm_installed = True


def _death_signal_setup() -> Callable[[], None] | None:
    """A preexec_fn giving the child SIGTERM when this process dies (Linux only), or None."""
    if not sys.platform.startswith("linux"):
        return None
    # PDEATHSIG fires when the *thread* that forked exits: only the main thread is safe.
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        # Resolved before the fork: loading libraries in the child is not async-signal-safe.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the tuner died before prctl took effect
            os._exit(1)

    return setup


# ----------------------------------------------------------------------------- the server


class ManagedServer:
    """An `ollama serve` the tuner starts, restarts when a server-level setting changes, and always stops."""

    def __init__(
        self,
        binary: str | None = None,
        models_dir: str | Path | None = None,
        *,
        ready_timeout_s: float = 60,
        log_dir: str | Path | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.binary = find_ollama(binary)
        self.base_env: dict[str, str] = dict(os.environ if base_env is None else base_env)
        self.models_dir = models_dir_for(models_dir, self.base_env)
        self.ready_timeout_s = ready_timeout_s
        self._log_dir = Path(log_dir) if log_dir is not None else None
        # Chosen once so the URL stays valid across restarts (clients can be built up front).
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: Version of the binary (``--version``), corrected by /api/version once started.
        self.version: str | None = None
        #: Effective server-level settings of the running server (None when stopped).
        self.current: dict[str, Any] | None = None
        self.starts = 0
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._env: dict[str, str] | None = None
        self._lock = threading.RLock()

    # -- public API ----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """PID of the running ``ollama serve`` (None when stopped)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def effective(self, settings: Mapping[str, Any], version: str | None = None) -> dict[str, Any]:
        """What the server will really run for ``settings`` (``version`` defaults to the binary's)."""
        return effective_settings(settings, version or self._version())

    def ensure(self, settings: Mapping[str, Any], version: str | None = None) -> bool:
        """Start, or restart if a server-level value differs; return True if (re)started.

        A server that died is started again. Raises LoadError if it does not come up.
        """
        with self._lock:
            ver = version or self._version()
            env = self._full_env(settings, ver)
            if self.alive and env == self._env:
                return False
            self._start(env)
            reported = self._reported_version()
            if version is None and reported and reported != ver:
                # The binary and the server disagree (wrapper script?): the server is right.
                self.version = reported
                env = self._full_env(settings, reported)
                if env != self._env:
                    self._start(env)
            self.current = effective_settings(settings, version or self.version)
            return True

    def check_alive(self, grace_s: float = 1.0) -> None:
        """Raise LoadError with the log's last lines if the server has died.

        Waits up to ``grace_s`` for a dying server: a dropped connection can arrive before
        the process has exited.
        """
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            return
        raise LoadError(f"ollama serve exited with code {proc.returncode}: {self._tail_line()}")

    def stop(self) -> None:
        """Terminate the server and its children (SIGTERM, then SIGKILL); idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            self._env, self.current = None, None
            _LIVE.discard(self)
            if proc is not None:
                _kill_tree(proc)
            if self._log is not None:
                self._log.close()
                self._log = None

    def log_tail(self, n: int = 20) -> str:
        """The last ``n`` lines of the current (or last) server log."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-n:])

    def __enter__(self) -> ManagedServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------
    def _version(self) -> str | None:
        if self.version is None:
            # Pointed at our own (still unused) port, --version reports the client's version
            # instead of asking whatever server listens on the default port.
            env = {**self.base_env, "OLLAMA_HOST": f"127.0.0.1:{self.port}"}
            self.version = binary_version(self.binary, env)
        return self.version

    def _full_env(self, settings: Mapping[str, Any], version: str | None) -> dict[str, str]:
        env = server_env(settings, version, self.base_env)
        env["OLLAMA_HOST"] = f"127.0.0.1:{self.port}"
        env["OLLAMA_MODELS"] = str(self.models_dir)
        return env

    def _start(self, env: dict[str, str]) -> None:
        self.stop()
        _install_hooks()
        log_dir = self._log_dir
        if log_dir is None:
            log_dir = self._log_dir = Path(tempfile.mkdtemp(prefix="ollama-tuner-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.log_path = log_dir / f"ollama-serve-{self.port}-{self.starts}.log"
        self._log = open(self.log_path, "wb")
        try:
            self._proc = subprocess.Popen(
                [self.binary, "serve"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: the runners die with it
                preexec_fn=_death_signal_setup(),
            )
        except OSError as e:
            self.stop()
            raise LoadError(f"ollama serve failed to start: cannot run {self.binary}: {e}") from None
        _LIVE.add(self)
        self._env = env
        self._wait_ready()

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if proc.poll() is not None:
                why = f"exited with code {proc.returncode}"
                break
            if self._get("/api/version", timeout_s=1.0) is not None:
                return
            if time.monotonic() >= deadline:
                why = f"not ready after {self.ready_timeout_s:g} s"
                break
            time.sleep(0.05)
        self.stop()
        raise LoadError(f"ollama serve failed to start ({why}): {self._tail_line()}")

    def _tail_line(self) -> str:
        lines = [ln.strip() for ln in self.log_tail(5).splitlines() if ln.strip()]
        tail = " | ".join(lines) or "no output"
        return f"{tail} (log: {self.log_path})"

    def _reported_version(self) -> str | None:
        data = self._get("/api/version", timeout_s=5.0)
        try:
            version = json.loads(data or b"{}").get("version")
        except (ValueError, AttributeError):
            return None
        return str(version) if version else None

    def _get(self, path: str, timeout_s: float) -> bytes | None:
        # No proxies: an HTTP(S)_PROXY from the environment must not intercept 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.url + path, timeout=timeout_s) as r:
                return bytes(r.read()) if r.status == 200 else None
        except (OSError, ValueError):
            return None


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, wait, then SIGKILL whatever is left of it and its children."""
    children = _children(proc.pid)
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    # Runners that left the group (or ignored SIGTERM) are killed too.
    _signal_group(proc.pid, signal.SIGKILL)
    for child in children:
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _children(pid: int) -> list[Any]:
    try:
        import psutil

        return list(psutil.Process(pid).children(recursive=True))
    except Exception:  # noqa: BLE001 - psutil missing or the process already gone
        return []
