"""stmae-edge: ST-MAE anomaly detection from training to the production line.

Importing the package imports neither torch nor onnxruntime: the runtime half must run without torch.
"""

__version__ = "0.1.0"
