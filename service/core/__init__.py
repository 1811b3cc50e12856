"""The contract every room leans on: the model repository on disk, onnxruntime sessions, v2
datatypes and tensors, errors and settings. It imports nothing else of slimserve."""
