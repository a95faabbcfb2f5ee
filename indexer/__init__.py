"""Documents in, vectors out: durable store, chunking, embedding worker, vector index."""
