"""The embedded default job: ELPV solar cells (PyPI `elpv-dataset`) laid out as an MVTec AD dataset.

ELPV labels each 300x300 electroluminescence cell image with a defect probability (0, 1/3, 2/3, 1)
and the cell type (mono, poly). The demo uses one cell type, the certainly good cells (0) for training
and as good test images, and the certainly defective cells (1) as the defective test images. ELPV has
no pixel masks, so the demo reports image-level metrics only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .errors import DatasetError, OutputError

VIEW_MARKER = ".stmae-edge-demo-view"  # marks the folder prepare_elpv made, which it may replace


def is_demo_view(folder: Path, src: Path) -> bool:
    """Whether `folder` is a view prepare_elpv made: marked, or (made before the mark) nothing but links
    into the ELPV package in its train/ and test/ folders."""
    if (folder / VIEW_MARKER).is_file():
        return True
    entries = list(folder.rglob("*"))
    files = [e for e in entries if not e.is_dir()]
    return bool(files) and {e.relative_to(folder).parts[0] for e in entries} <= {"train", "test"} and all(
        f.is_symlink() and Path(f.readlink()).resolve().is_relative_to(src.resolve()) for f in files)


def elpv_root() -> Path:
    try:
        import elpv_dataset
    except ImportError as exc:
        raise DatasetError("the demo needs the ELPV dataset: pip install \"stmae-edge[demo]\" "
                           "(or pip install elpv-dataset)") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def prepare_elpv(out: Path | str, cell_type: str = "mono", test_good_fraction: float = 0.2,
                 max_train: int = 0, max_defective: int = 0, seed: int = 0) -> Path:
    """Link (or copy) ELPV images into out/train/good, out/test/good, out/test/defective.

    Args:
        out: the view's folder; one the demo made before is rebuilt, any other existing one refused.
        cell_type: "mono" or "poly" cells.
        test_good_fraction: the share of defect-free cells held out for the test set.
        max_train: at most this many good training cells (0: all).
        max_defective: at most this many defective test cells (0: all).
        seed: the draw of test cells and of the capped ones.

    Returns:
        `out`, laid out in the MVTec AD layout.

    Raises:
        DatasetError: elpv-dataset is not installed, or has no cells of `cell_type`.
        OutputError: `out` exists and is not a view the demo made, or cannot be written.
    """
    src = elpv_root()
    rows = np.genfromtxt(src / "labels.csv", dtype=["U32", "f8", "U8"], names=["path", "prob", "type"])
    rows = rows[rows["type"] == cell_type]
    if rows.size == 0:
        raise DatasetError(f"ELPV has no cells of type {cell_type!r}; use mono or poly")
    rng = np.random.default_rng(seed)
    good = rng.permutation(rows["path"][rows["prob"] == 0.0])
    defective = sorted(rows["path"][rows["prob"] == 1.0])
    n_test_good = int(round(len(good) * test_good_fraction))
    # Both drawn from the same shuffle: the file names are not in random order (ELPV's cells come from
    # 44 modules), and the first 240 names, which the cap used to take, stop halfway through the numbers
    # (docs/BENCHMARKS.md, the demo).
    test_good, train_good = sorted(good[:n_test_good]), good[n_test_good:]
    train_good = sorted(train_good[:max_train] if max_train else train_good)
    if max_defective:
        defective = [defective[i] for i in sorted(rng.permutation(len(defective))[:max_defective])]

    out = Path(out)
    if out.exists() and not is_demo_view(out, src):
        # never delete what the demo did not make: a --workdir may be a folder of the user's own
        raise OutputError(f"{out} exists and is not a dataset view the demo made; choose another --workdir "
                          "or remove the folder yourself")
    try:
        # A view we made ourselves: its train/ and test/ are rebuilt each run so that they match the
        # split. Nothing else in the folder is ours to remove (results a user saved beside them stay).
        for made in ("train", "test"):
            if (out / made).is_symlink() or (out / made).is_file():
                (out / made).unlink()
            elif (out / made).is_dir():
                shutil.rmtree(out / made)
        out.mkdir(parents=True, exist_ok=True)
        (out / VIEW_MARKER).write_text("links into the elpv-dataset package, made by `stmae-edge demo`; "
                                       "rebuilt on each run\n")
        for folder, names in (("train/good", train_good), ("test/good", test_good), ("test/defective", defective)):
            target = out / folder
            target.mkdir(parents=True)
            for name in names:
                source = src / name
                link = target / source.name
                try:
                    link.symlink_to(source)
                except OSError:  # filesystems without symlinks
                    shutil.copyfile(source, link)
    except OSError as exc:
        raise OutputError(f"cannot lay out the demo dataset in {out}: {exc}; choose another --workdir") from exc
    return out
