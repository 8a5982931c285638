"""Evaluation: a model and a labelled dataset -> metrics, an operating point and a report page.

    model (.pt, .onnx or .plan) + DATA/test --evaluate.py, validation.py (through the runtime's
    backends)--> maps and scores --metrics.py--> image / pixel AUROC, AUPRO, F1
    --operating_point.py--> a threshold for a false-reject or recall target --report.py--> HTML page

metrics.py and operating_point.py need neither torch nor ONNX Runtime. The package itself imports
nothing.
"""
