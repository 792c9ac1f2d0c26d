"""aiod's exit codes, in one place (documented in `aiod --help` and the README)."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2      # bad command-line usage
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: the kernel refused the AIO resources asked for
EXIT_CONFIG = 78    # EX_CONFIG: the configuration is invalid
EXIT_NOT_SERVING = 3   # `aiod status`: the daemon answered but is starting, draining or stalled
EXIT_UNREACHABLE = 69  # EX_UNAVAILABLE, `aiod status`: nothing answered at the status URL
