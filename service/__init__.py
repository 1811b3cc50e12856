"""slimserve's online half: the model repository reader, onnxruntime sessions and the server.

Importing this package is cheap and never pulls in torch or scikit-learn.
"""
