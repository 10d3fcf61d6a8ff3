"""The model worker: loads a model, owns the KV cache and runs the steps the scheduler plans.

Kept import-light (no torch here): `gpu_worker.service` imports what it needs when it starts.
"""
