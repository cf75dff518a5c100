"""A TCP proxy in front of a service, switchable off and on: an outage without losing data.

moto keeps its objects in memory, so killing it would lose every staged input and output;
switching the proxy off makes S3 unreachable (connections refused, open ones reset) while
what S3 holds survives, which is also what a network partition looks like to a worker.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time


class TcpProxy:
    def __init__(self, upstream_port: int, port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.address = (host, port)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        # Bytes per second from clients to the service (uploads), 0 = as fast as it goes:
        # a slow link makes an upload last long enough to be interrupted on purpose.
        self.upload_rate = 0

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def up(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self.address)
        listener.listen(256)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), name="tcp-proxy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse new connections and reset every open one, as a partition would."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            open_now, self._connections = list(self._connections), set()
        for connection in open_now:
            _reset(connection)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # switched off meanwhile
                    _reset(client)
                    _reset(server)
                    return
                self._connections.update((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        peers = {client: server, server: client}
        try:
            for end in peers:
                end.setblocking(True)
                selector.register(end, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select(timeout=1.0):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    throttled = source is client and self.upload_rate > 0
                    data = source.recv(1024 if throttled else 65536)
                    if not data:
                        return
                    if throttled:
                        time.sleep(len(data) / self.upload_rate)
                    peers[source].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            with self._lock:
                self._connections.discard(client)
                self._connections.discard(server)
            for end in peers:
                with contextlib.suppress(OSError):
                    end.close()


def _reset(connection: socket.socket) -> None:
    """Close with RST rather than FIN: the peer sees 'connection reset', not a clean end."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        connection.close()
