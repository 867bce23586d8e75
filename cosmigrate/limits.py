"""Process limits the daemon relies on: enough file handles for capture, whatever the control socket sees.

systemd starts services with a soft RLIMIT_NOFILE of 1,024 and a much higher
hard limit (and the unit may set its own). The daemon raises the soft limit
to the hard one at start (it uses epoll, never select(), so a high limit is
safe), and the control socket serves only a small number of connections at
once (`control.connection_cap`), so capture's store files, ledger and driver
connections always have handles to spare.
"""

from __future__ import annotations

import resource


def raise_open_file_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return (soft, hard) now in force.

    `prlimit` (the prlimit64 system call) rather than setrlimit: the unit's system call
    filter allows prlimit64 (@system-service) and denies setrlimit (@resources).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.prlimit(0, resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass  # keep the limit we have: the connection cap is derived from it
    return soft, hard
