"""The v2 gRPC transport: a thin codec over the dataplane (``inference.GRPCInferenceService``)."""
