"""gRPC transport: a thin servicer, proto <-> domain conversion, interceptors."""
