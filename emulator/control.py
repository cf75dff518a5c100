"""Start the emulator as its own process and drive its admin API (faults, config, counters).

Used by the tests, the benchmarks and the local stack; it is the emulator's only client
besides the fal protocol itself.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import httpx

from emulator.account import account_id
from producers.devstack import free_port, stop_process, wait_for_port


class EmulatorProcess:
    def __init__(self, process: subprocess.Popen[bytes], port: int, data_dir: Path, tls: bool) -> None:
        self.process = process
        self.port = port
        self.data_dir = data_dir
        self.tls = tls
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.cert_path = data_dir / "tls" / "emulator-cert.pem" if tls else None
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(self.cert_path)) if tls else True
        self._admin = httpx.Client(base_url=self.url, timeout=30, verify=verify)

    # admin API ----------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self._admin.post(path, json=body)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def configure(self, **values: Any) -> dict[str, Any]:
        return self._post("/_admin/config", values)

    def set_faults(self, **specs: Any) -> dict[str, Any]:
        return self._post("/_admin/faults", specs)

    def clear_faults(self) -> None:
        self._admin.delete("/_admin/faults").raise_for_status()

    def reset(self) -> None:
        self._post("/_admin/reset", {})

    def counters(self) -> dict[str, Any]:
        response = self._admin.get("/_admin/counters")
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    # the account: its lock, revoked keys, the request listing ------------------------------
    def lock(self, seconds: float, key: str | None = None) -> dict[str, Any]:
        """Every submit (of `key`, or of every key) answers fal's 403 'Exhausted balance' for `seconds`."""
        return self._post("/_admin/account/lock", {"seconds": seconds, "key": key})

    def unlock(self, key: str | None = None) -> dict[str, Any]:
        """A top-up: the lock ends now."""
        return self._post("/_admin/account/unlock", {"key": key})

    def revoke(self, key: str) -> dict[str, Any]:
        """The key answers 401 on every call from now on."""
        return self._post("/_admin/account/revoke", {"key": key})

    def restore(self, key: str) -> dict[str, Any]:
        return self._post("/_admin/account/restore", {"key": key})

    def account(self, key: str) -> dict[str, Any]:
        """One key's counters: in_queue, in_progress, max_in_progress, max_in_queue, created, started, ..."""
        accounts: dict[str, Any] = self.counters()["accounts"]
        return dict(accounts.get(account_id(key), {}))

    def list_requests(self, key: str, endpoint_id: str, **params: Any) -> dict[str, Any]:
        """fal's `GET /v1/models/requests/by-endpoint` as `key` sees it (params as fal names them)."""
        response = self._admin.get(
            "/v1/models/requests/by-endpoint",
            params={"endpoint_id": endpoint_id, **params},
            headers={"Authorization": f"Key {key}"},
        )
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def requests(self) -> list[dict[str, Any]]:
        """Every fal request created since the last reset: id, marker, input_key, status."""
        response = self._admin.get("/_admin/requests")
        response.raise_for_status()
        answer: list[dict[str, Any]] = response.json()["requests"]
        return answer

    def created_since(self, before: dict[str, Any]) -> int:
        """Requests created since `before` (a `counters()` snapshot): this test's own, not the session's."""
        return int(self.counters()["created"]) - int(before["created"])

    def inspect(self, request_id: str) -> dict[str, Any]:
        response = self._admin.get(f"/_admin/requests/{request_id}")
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    # lifecycle ------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the server and remove what it served: outputs, its certificate."""
        self._admin.close()
        stop_process(self.process)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_emulator(
    *args: str, tls: bool = False, port: int | None = None, log: IO[bytes] | None = None
) -> EmulatorProcess:
    """Start `python -m emulator` on a free port and wait until it answers.

    A free port is closed again before the child binds it, so another process may take it
    first: then (port not given) it starts again on another one, up to three times.
    """
    for attempt in range(1, 4):
        try:
            return _start_emulator(args, tls=tls, port=port, log=log)
        except _PortTaken:
            if port is not None or attempt == 3:
                raise
    raise AssertionError("unreachable")


class _PortTaken(RuntimeError):
    pass


def _start_emulator(args: tuple[str, ...], *, tls: bool, port: int | None, log: IO[bytes] | None) -> EmulatorProcess:
    port = port or free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="fal-emulator-"))
    command = [
        sys.executable, "-m", "emulator", "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data_dir), *args,
    ]  # fmt: skip
    if tls:
        command.append("--tls")
    process = subprocess.Popen(
        command, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL
    )
    try:
        wait_for_port(port, timeout=30, process=process)
    except RuntimeError as exc:  # it exited before listening: most likely the port was taken
        shutil.rmtree(data_dir, ignore_errors=True)
        raise _PortTaken(str(exc)) from None
    server = EmulatorProcess(process, port, data_dir, tls)
    deadline = time.monotonic() + 30
    while True:
        try:
            server.counters()
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.1)
            continue
        if process.poll() is not None:  # someone else answered on the port; ours is gone
            server.stop()
            raise _PortTaken(f"port {port} answers, but not from the emulator started on it")
        return server
