"""The gRPC edge, answer composition and generation backends."""
