"""Export and engines: a checkpoint -> ONNX graphs -> TensorRT plans.

    model.pt --export.py--> model.onnx (fp32; fp16 by half_precision.py) --verify.py--> checked against
    PyTorch --calibrate.py--> model.int8.onnx (Q/DQ, calibrated on good images) --build.py--> model.plan
    and its sidecar (engine_plan.py, shared with the runtime, reads and writes the pair); parity.py says
    how closely a graph must reproduce its model.

export.py and verify.py need torch; calibrate.py and build.py do not (ONNX Runtime's quantiser,
TensorRT or TensorRT for RTX). The package itself imports nothing.
"""
