"""pocketembed.ipc: the wire protocol and the clients.

This package must stay importable without llama-cpp-python: an app that only
talks to the daemon installs no inference stack. (tests/test_package.py checks it.)
"""

from .client import (AccessDenied, AsyncClient, Busy, Client, DaemonError, DaemonTimeout, InvalidRequest, ModelError,
                     StorageFailed, Unavailable)

__all__ = ["AccessDenied", "AsyncClient", "Busy", "Client", "DaemonError", "DaemonTimeout", "InvalidRequest",
           "ModelError", "StorageFailed", "Unavailable"]
