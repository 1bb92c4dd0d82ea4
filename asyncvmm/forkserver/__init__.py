"""The fork server ("zygote"): VMM processes forked from a warm parent.

A cold ``asyncvmm`` spends most of its start importing Python modules and
most of its memory holding them.  The fork server imports and warms them
once, freezes the garbage collector so the children share those pages, and
forks one ordinary VMM process per request on a Unix socket only its owner
can use.  ``asyncvmm`` started with ``ASYNCVMM_FORKSERVER=<socket>`` in its
environment becomes a thin launcher (``launcher.py``, stdlib only) that
hands its argv, working directory, environment, rlimits and stdio to the
server and then stands in for the forked VMM: signals forwarded, exit code
returned.  docs/forkserver.md has the design; ``protocol.py`` the wire format.

This package's ``__init__`` must stay import-free: the launcher imports it.
"""

ENV_VAR = "ASYNCVMM_FORKSERVER"
