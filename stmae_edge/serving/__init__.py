"""Serving a model through NVIDIA Triton Inference Server.

    stmae-edge serve MODEL ──> server.py: PyTriton starts a real tritonserver; per model file, four
                               Triton models (wire_format.py names them), each feeding one Detector:
        NAME          images (N, 3, H, W) float32, preprocessed by the client with the package
        NAME_frames   frames (N, H, W, 3) uint8 BGR at the model's input size, preprocessed here
        NAME_gray     frames (N, H, W) uint8 at the model's input size, preprocessed here
        NAME_metadata the model's metadata as JSON
      each answering score, normalized_score, is_anomalous, anomaly_map and error per image
    stmae-edge triton-repo MODEL ──> repository.py: a model repository for the official Triton container
    runtime.remote.RemoteDetector ──> either server over HTTP (no extra package) or gRPC (tritonclient):
                               the same Detection results as the in-process Detector

Dynamic batching comes from Triton: requests from any number of clients are queued and handed to the
model in batches of up to --max-batch. Wrong shapes, dtypes and batches above the maximum are refused
by Triton before the model sees them; a NaN image gets its own error and the rest of its batch is scored.
"""
