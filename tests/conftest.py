"""Settings for the whole suite."""

import os

# gRPC's C core prints its own chatter ("Got goaway") at info level; the CLI silences it
# the same way (vantage.cli).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
