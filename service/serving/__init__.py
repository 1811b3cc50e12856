"""The online server's engine: loaded models, dynamic batching, metrics, and the one
transport-independent dataplane that every transport calls."""
