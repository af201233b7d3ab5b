"""Whether a process that recorded itself as `host:pid` (a job run, a lease holder) still exists."""

from __future__ import annotations

import os
import socket


def gone_on_this_host(host: str, pid: str) -> bool | None:
    """True when `pid` ran on this host and no longer exists, False when it is alive (or is this
    process), None when that cannot be told from here (another host, or no pid)."""
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
