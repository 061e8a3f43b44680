"""Generated gRPC stubs of the gmtrouter contract (protos/gmtrouter/v1/router.proto)."""
