"""Settings for the whole suite."""

import os

# Tests that talk gRPC in-process then start children (Stack, `extproc serve`) fork while
# gRPC's threads run; its fork handlers then abort the child now and then ("Other threads are
# currently calling into gRPC, skipping fork() handlers", exit -6). The child only execs.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
