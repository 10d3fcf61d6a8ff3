"""The scheduler process: request state, continuous batching, the KV block pool."""
