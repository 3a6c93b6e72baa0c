"""Loaded by every Python process the tests start (via PYTHONPATH): no traffic beyond loopback.

Any socket connection to a non-loopback address raises, so even a buggy guard under
test cannot send traffic out.
"""

import ipaddress
import socket

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check(address) -> None:
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            try:
                ip = ipaddress.ip_address(socket.gethostbyname(host))
            except OSError:
                raise ConnectionRefusedError(f"test network guard: cannot resolve {host!r}") from None
        if not ip.is_loopback and not ip.is_unspecified:
            raise ConnectionRefusedError(f"test network guard: connection to {host} refused (loopback only)")


def _connect(self, address):
    _check(address)
    return _real_connect(self, address)


def _connect_ex(self, address):
    _check(address)
    return _real_connect_ex(self, address)


socket.socket.connect = _connect
socket.socket.connect_ex = _connect_ex
