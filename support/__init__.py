"""What the tests and the benchmarks share: the model-free fake engine, and the tiny random-weight
models and GGUF files built on the spot (no model can be downloaded here)."""
