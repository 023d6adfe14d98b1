"""Test-wide JAX settings."""

import os
import socket

import pytest

# Tests compile many small programs once each: cheaper LLVM optimisation makes XLA's CPU
# compiles much faster, at a small cost in run time (set before JAX creates its backend).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (
        _flags + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    ).strip()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
