"""The embedder: the protocol and its factory (`embedder`), sentence-transformers on torch, onnxruntime
lanes (`onnx_embedder`) and the one-time ONNX export of the packaged model (`onnx_export`)."""
