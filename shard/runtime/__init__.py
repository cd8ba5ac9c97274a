"""The shard at run time: the gRPC server, the engine stepping batches, the sequences it holds
between steps, the paged KV cache, the order of pipelined steps and grammar state."""
