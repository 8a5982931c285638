"""Training: good images -> a checkpoint (.pt) with its metadata, thresholds and score statistics.

    images --(preprocessing)--> frozen backbone features --> ST-MAE (train.py) or the filtering
    autoencoder (filtering.py, with corruption.py's synthetic defects) --> held-out good images set
    the score statistics and the default threshold --> checkpoint.py writes the file
    labelled defects (--defects) --> defect_head.py's head on the map, fitted last; add_defects.py
    fits it on a checkpoint already written
    baseline.py fits the detectors the benchmarks compare against, on the same features.

Needs the train extra (torch); nothing here is imported by the runtime. The package itself imports
nothing, so `import stmae_edge.training.X` loads only what X needs.
"""
