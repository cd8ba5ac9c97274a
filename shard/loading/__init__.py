"""Loading a checkpoint for serving: transformers' load with our attention plugged in, GGUF
files taken from their own blocks, and the prepared model saved for fast restarts."""
