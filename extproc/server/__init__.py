"""Everything that speaks to Envoy: the per-request session (pure logic, no
protobuf) and the thin gRPC servicers that translate it."""
