"""`stmae-edge report MODEL DATA --out report/`: one HTML page that shows what the model does on a
labelled set, for the quality engineer who decides whether to trust it.

    validation.score_dataset          every test image through the runtime (any model file)
      -> the operating point at the model's own thresholds (operating_point), with 95% intervals
      -> plots, drawn by matplotlib (the `report` extra): score histograms with the threshold, the
         ROC curve and the per-region-overlap curve, each with the operating point  -> OUT/plots/
      -> the worst cases first: missed defects (lowest scores) and false rejects (highest), each as
         image, anomaly-map overlay with the ground-truth outline, and its score        -> OUT/cases/
      -> OUT/index.html: relative links only, no server and no network; a few lines of script on the
         page say whether every image loaded

Per defect type: count, image AUROC against the good images, escapes at the threshold.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np

from .. import data
from ..errors import ConfigError, OutputError
from ..outputs import (
    check_output_folder,
    failure_reason,
    move_into_place,
    same_file,
    signals_held,
    staging_folder,
    sync_folder,
    write_bytes_atomically,
)
from ..preprocessing import load_image
from ..progress import progress_bar
from ..scoring import fails, threshold_scoring
from .metrics import (
    aupro,
    image_auroc,
    image_auroc_by_type,
    image_auroc_interval_by_type,
    interval_or_none,
    interval_text,
    metric_or_none,
    percent_text,
    pixel_auroc,
    pro_curve,
    roc_curve,
)
from .operating_point import evaluate_threshold
from .validation import ScoredDataset, score_dataset

CASE_SIDE = 320  # pixels: the longer side of each case picture on the page
OUTLINE = (255, 255, 255)  # ground truth, drawn over the overlay (BGR)


def build_report(model: Path | str, data_dir: Path | str, out: Path | str, backend: str | None = None,
                 worst: int = 8, batch_size: int = 16, bit_depth: int | None = None) -> dict:
    """Score DATA_DIR/test with MODEL and write OUT/index.html with its plots and cases.

    Args:
        model: a .pt, .onnx or .plan file.
        data_dir: a labelled set in the MVTec AD layout (DATA_DIR/test/<type>, masks in ground_truth/).
        out: the report's folder (not inside DATA_DIR).
        backend: a runtime backend, or None: the file kind's CPU backend (validation.EVALUATION_BACKENDS).
        worst: missed defects and false rejects shown, each (the worst first).
        batch_size: images scored at once.
        bit_depth: significant bits of 16-bit pixels in place of the model's (as `predict --bit-depth`).

    Returns:
        The summary written as OUT/summary.json.

    Raises:
        ConfigError: matplotlib is not installed (pip install "stmae-edge[report]"), or `worst` < 0.
        OutputError: OUT lies inside DATA_DIR, or cannot be written.
        DatasetError: no test images, or test images or masks that cannot be read; and the typed errors
            of the model file readers.
    """
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise ConfigError(f"--worst {worst!r} must be a whole number >= 0")
    plt = _pyplot()
    out, data_dir = Path(out), Path(data_dir)
    if same_file(out, data_dir) or data_dir.resolve() in out.resolve().parents:
        raise OutputError(f"--out {out} is inside the data folder {data_dir}: its pictures would be read as test "
                          "images next time; choose a folder outside it")
    out = check_output_folder(out, [])
    for folder in PICTURE_FOLDERS:
        if not (out / folder).is_symlink() and (out / folder).exists() and not (out / folder).is_dir():
            raise OutputError(f"{out / folder} is a file, where the report keeps its pictures; move it or choose "
                              "another --out")
    scored = score_dataset(model, data_dir, backend, batch_size, description="scoring for the report",
                           bit_depth=bit_depth)
    detector = scored.detector
    thresholds = detector.thresholds
    labels = scored.labels
    point = evaluate_threshold(thresholds.image, scored.good_scores, scored.defect_scores, thresholds.rule)
    size = detector.preprocessing.input_size
    masks = data.load_masks(scored.samples, size) if data.has_masks(scored.samples) else None

    summary = {"model": str(model), "data": str(data_dir), "images": len(labels), "operating_point": point.to_dict(),
               "image_auroc": metric_or_none(image_auroc(labels, scored.scores)),
               "image_auroc_interval": interval_or_none(labels, scored.scores)}
    if masks is not None:
        summary["pixel_auroc"] = metric_or_none(pixel_auroc(masks, scored.maps))
        summary["aupro"] = metric_or_none(aupro(masks, scored.maps))
    # The page and its pictures are made in a staging folder and put in place together at the end: an
    # interrupted run leaves the earlier report as it was, not its page over another model's pictures.
    with staging_folder(out) as staging:
        for folder in PICTURE_FOLDERS:
            (staging / folder).mkdir()
        plots = {"histogram": _histogram(plt, scored, thresholds.image, staging / "plots" / "scores.png"),
                 "roc": _roc(plt, labels, scored.scores, point, staging / "plots" / "roc.png")}
        if masks is not None:
            plots["pro"] = _pro(plt, masks, scored.maps, thresholds.pixel, staging / "plots" / "pro.png")
        per_type = _per_type(scored, thresholds.image)
        cases = _cases(scored, masks is not None, worst, staging / "cases")
        page = _page(summary, point, detector, per_type, plots, cases)
        write_bytes_atomically(staging / "index.html", page.encode(), follow_links=False)
        write_bytes_atomically(staging / "summary.json", (json.dumps(_finite(summary), indent=2, allow_nan=False)
                                                          + "\n").encode(), follow_links=False)
        _put_in_place(staging, out)
    summary["index"] = str(out / "index.html")
    return summary


PICTURE_FOLDERS = ("plots", "cases")  # the report's pictures; a user's own files there are left alone
# The pictures a report writes (plots/<name>.png, cases/<kind>-<rank>-<image|overlay>.png): what a later
# report replaces or removes, and nothing else
REPORT_PICTURE = re.compile(r"(scores|roc|pro)\.png|(missed|false_rejects)-\d+-(image|overlay)\.png")


def _put_in_place(staging: Path, out: Path) -> None:
    """The staged pictures, page and summary moved into `out` with Ctrl-C held. The earlier report's
    pictures go into the staging folder, to be removed with it; other files in plots/ and cases/ stay,
    and a link planted at either folder's name is removed, never followed."""
    try:
        with signals_held():
            for folder in PICTURE_FOLDERS:
                earlier, staged = out / folder, staging / folder
                if earlier.is_symlink():
                    earlier.unlink()
                if not earlier.is_dir():
                    move_into_place(staged, earlier)
                    continue
                (staging / f"earlier-{folder}").mkdir()
                for picture in earlier.iterdir():
                    if REPORT_PICTURE.fullmatch(picture.name) and (picture.is_file() or picture.is_symlink()):
                        move_into_place(picture, staging / f"earlier-{folder}" / picture.name)
                for picture in staged.iterdir():
                    move_into_place(picture, earlier / picture.name)
            for name in ("index.html", "summary.json"):
                move_into_place(staging / name, out / name)
            sync_folder(out)
    except OSError as exc:
        raise OutputError(f"cannot write the report into {out}: {failure_reason(exc, out)}; choose another --out") from exc


def _finite(value):
    """JSON without NaN (rates on a set with no good or no defective image): None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no screen on a line PC or in CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the report draws its plots with matplotlib: pip install \"stmae-edge[report]\"") from None
    return plt


# --- plots ----------------------------------------------------------------------------------------
def _save(plt, figure, path: Path) -> str:
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomically(path, png.getvalue(), follow_links=False)
    return f"plots/{path.name}"


def _histogram(plt, scored: ScoredDataset, threshold: float, path: Path) -> str:
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    bins = np.histogram_bin_edges(scored.scores, bins=40)
    axis.hist(scored.good_scores, bins=bins, alpha=0.6, label=f"good ({scored.good_scores.size})", color="tab:blue")
    axis.hist(scored.defect_scores, bins=bins, alpha=0.6, label=f"defective ({scored.defect_scores.size})",
              color="tab:red")
    axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.6g}")
    axis.set_xlabel("image score (raw units)")
    axis.set_ylabel("images")
    axis.legend()
    return _save(plt, figure, path)


def _roc(plt, labels: np.ndarray, scores: np.ndarray, point, path: Path) -> str:
    figure, axis = plt.subplots(figsize=(4.2, 4.0))
    if labels.min() != labels.max():
        curve = roc_curve(labels, scores)
        axis.plot(curve["fpr"], curve["tpr"], color="tab:purple")
        axis.plot([point.false_reject_rate], [point.recall], "ko", label="threshold")
        axis.legend(loc="lower right")
    axis.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    axis.set_xlabel("false-reject rate (good images)")
    axis.set_ylabel("recall (defective images)")
    axis.set_title("ROC, images")
    return _save(plt, figure, path)


def _pro(plt, masks: np.ndarray, maps: np.ndarray, pixel_threshold: float, path: Path) -> str:
    curve = pro_curve(masks, maps, max_fpr=0.3, threshold=pixel_threshold)
    figure, axis = plt.subplots(figsize=(4.2, 4.0))
    axis.plot(curve["fpr"], curve["pro"], color="tab:green")
    if curve["point"] and curve["point"][0] <= 0.3:
        axis.plot([curve["point"][0]], [curve["point"][1]], "ko", label="pixel threshold")
        axis.legend(loc="lower right")
    axis.set_xlim(0, 0.3)
    axis.set_ylim(0, 1)
    axis.set_xlabel("false-positive rate (normal pixels)")
    axis.set_ylabel("per-region overlap")
    axis.set_title("PRO, pixels (up to 30% FPR)")
    return _save(plt, figure, path)


# --- tables and cases -----------------------------------------------------------------------------
def _per_type(scored: ScoredDataset, threshold: float) -> list[dict]:
    types = np.array([s.defect_type for s in scored.samples])
    aurocs = image_auroc_by_type(scored.labels, scored.scores, types)
    intervals = image_auroc_interval_by_type(scored.labels, scored.scores, types)
    rows = []
    for name, auroc in aurocs.items():
        scores = scored.scores[types == name]
        escapes = int((~fails(scores, threshold)).sum())
        rows.append({"type": name, "images": int(scores.size), "image_auroc": auroc, "escapes": escapes,
                     "image_auroc_interval": intervals[name]})
    return rows


def _cases(scored: ScoredDataset, with_masks: bool, worst: int, folder: Path) -> dict[str, list[dict]]:
    """Missed defects, lowest score first, and false rejects, highest first: up to `worst` of each."""
    from ..runtime.overlay import display_image, render_overlay
    from ..runtime.postprocess import postprocess

    detector = scored.detector
    threshold = detector.thresholds.image
    order = np.argsort(scored.scores, kind="stable")
    failed = fails(scored.scores, threshold)
    missed = [int(i) for i in order if scored.samples[i].label == 1 and not failed[i]][:worst]
    rejected = [int(i) for i in order[::-1] if scored.samples[i].label == 0 and failed[i]][:worst]
    chosen = {"missed": missed, "false_rejects": rejected}
    out: dict[str, list[dict]] = {"missed": [], "false_rejects": []}
    with progress_bar("drawing the worst cases", len(missed) + len(rejected)) as advance:
        for kind, indices in chosen.items():
            for rank, i in enumerate(indices):
                sample = scored.samples[i]
                image = load_image(sample.path, detector.preprocessing.max_pixels)
                detection = postprocess(scored.maps[i:i + 1], scored.scores[i:i + 1].astype(np.float32),
                                        [image.shape[:2]], [str(sample.path)], detector.thresholds,
                                        detector.score_stats, detector.min_region_area, detector.map_stats)[0]
                overlay = render_overlay(image, detection, detector.map_stats,
                                         bit_depth=detector.preprocessing.bit_depth)
                if with_masks and sample.mask_path is not None:
                    mask = data.load_mask(sample, image.shape[:2]).astype(np.uint8)
                    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                    cv2.drawContours(overlay, contours, -1, OUTLINE, max(1, round(max(image.shape[:2]) / 250)))
                base = display_image(image, detector.preprocessing.bit_depth)
                stem = f"{kind}-{rank:02d}"
                for suffix, picture in (("image", base), ("overlay", overlay)):
                    ok, png = cv2.imencode(".png", _fit(picture))
                    if not ok:  # as predict does: a page without the picture it names would mislead
                        raise OutputError(f"cannot encode the {suffix} of {sample.path} for the report")
                    write_bytes_atomically(folder / f"{stem}-{suffix}.png", png.tobytes(), follow_links=False)
                out[kind].append({"source": str(sample.path), "type": sample.defect_type, "score": float(scored.scores[i]),
                                  "normalized": float(detection.normalized_score), "regions": len(detection.regions),
                                  "image": f"cases/{stem}-image.png", "overlay": f"cases/{stem}-overlay.png"})
                advance(1)
    return out


def _fit(picture: np.ndarray) -> np.ndarray:
    scale = CASE_SIDE / max(picture.shape[:2])
    if scale >= 1:
        return picture
    size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
    return cv2.resize(picture, size, interpolation=cv2.INTER_AREA)


# --- the page -------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
th { background: #f4f4f4; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.plots img { margin: 4px; border: 1px solid #ddd; } .cases { display: flex; flex-wrap: wrap; gap: 14px; }
.case { border: 1px solid #ddd; padding: 6px; font-size: 0.85em; } .case img { display: block; margin-bottom: 4px; }
.bad { color: #b00; } #image-check { font-size: 0.85em; color: #555; } code { font-size: 0.9em; }
"""

CHECK_IMAGES = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (im) { return !(im.complete && im.naturalWidth > 0); });
  var note = document.getElementById('image-check');
  note.textContent = broken.length ? broken.length + ' of ' + images.length + ' images did not load: ' +
    broken.map(function (im) { return im.getAttribute('src'); }).join(', ') : 'all ' + images.length + ' images loaded';
  note.className = broken.length ? 'bad' : '';
  document.body.setAttribute('data-images', images.length + ' ' + broken.length);
});
"""


def _page(summary: dict, point, detector, per_type: list[dict], plots: dict, cases: dict) -> str:
    e = html.escape
    meta = detector.metadata
    ci = point.intervals()
    config = meta.config
    config_items = ", ".join(f"{k} {v}" for k, v in config.items()
                             if k in ("backbone", "layers", "input_size", "grid", "patch", "mask_unit",
                                      "gaussian_weight", "gaussian_input", "gaussian_scale", "transition_weight",
                                      "gaussian_dim"))
    training = meta.training
    rows = [("false-reject rate", point.false_reject_rate, "false_reject_rate", f"{point.false_rejects} of {point.goods} good"),
            ("escape rate", point.escape_rate, "escape_rate", f"{point.escapes} of {point.defects} defective"),
            ("precision", point.precision, "precision", ""), ("recall", point.recall, "recall", "")]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>stmae-edge report: {e(Path(summary['model']).name)}</title>",
             f"<style>{STYLE}</style><script>{CHECK_IMAGES}</script></head><body>",
             f"<h1>What {e(Path(summary['model']).name)} does on {e(summary['data'])}</h1>",
             f"<p>{summary['images']} images. Image AUROC {percent_text(summary['image_auroc'])} "
             f"(95% interval {interval_text(summary['image_auroc_interval'])})"
             + (f", pixel AUROC {percent_text(summary.get('pixel_auroc'))}, AUPRO@30% {percent_text(summary.get('aupro'))}" if "aupro" in summary else "")
             + f". Scored by {e(detector.info['backend'])} on {e(detector.info['device'])}. <span id='image-check'>checking images...</span></p>",
             "<h2>At the model's threshold</h2>",
             f"<p>Image threshold <b>{point.threshold:.6g}</b> ({e(point.rule)}); pixel threshold {detector.thresholds.pixel:.6g}. "
             "An image fails when its score is above the threshold. Intervals are 95% Wilson intervals: they say how few images a figure rests on.</p>",
             "<table><tr><th>measure</th><th class='num'>%</th><th class='num'>95% interval</th><th>counts</th></tr>"]
    for name, value, key, counts in rows:
        parts.append(f"<tr><td>{name}</td><td class='num'>{percent_text(value)}</td><td class='num'>{interval_text(ci[key])}</td>"
                     f"<td>{counts}</td></tr>")
    parts.append("</table><p>Move it with <code>stmae-edge threshold MODEL DATA --max-false-reject 0.01 --write</code> "
                 "(or <code>--min-recall 0.95</code>).</p>")
    parts.append("<h2>Scores and curves</h2><div class='plots'>")
    parts += [f"<img src='{e(src)}' alt='{e(name)}'>" for name, src in plots.items()]
    parts.append("</div><h2>Per defect type</h2><table><tr><th>type</th><th class='num'>images</th>"
                 "<th class='num'>image AUROC</th><th class='num'>95% interval</th><th class='num'>escapes at the threshold</th></tr>")
    for row in per_type:
        parts.append(f"<tr><td>{e(row['type'])}</td><td class='num'>{row['images']}</td><td class='num'>{percent_text(row['image_auroc'])}</td>"
                     f"<td class='num'>{interval_text(row['image_auroc_interval'])}</td>"
                     f"<td class='num'>{row['escapes']} ({percent_text(row['escapes'] / row['images'] if row['images'] else None)}%)</td></tr>")
    parts.append("</table>")
    for kind, title, none in (("missed", "Missed defects, lowest score first", "No defective image scored at or below the threshold."),
                              ("false_rejects", "False rejects, highest score first", "No good image scored above the threshold.")):
        parts.append(f"<h2>{title}</h2>")
        if not cases[kind]:
            parts.append(f"<p>{none}</p>")
            continue
        parts.append("<p>Left: the image. Right: the anomaly map over it, defect regions boxed, the ground truth outlined in white.</p><div class='cases'>")
        for case in cases[kind]:
            parts.append(f"<div class='case'><div style='display:flex;gap:4px'><img src='{e(case['image'])}' alt='image'>"
                         f"<img src='{e(case['overlay'])}' alt='overlay'></div>{e(Path(case['source']).name)} ({e(case['type'])}): "
                         f"score {case['score']:.4g}, {case['normalized']:+.1f} sd, {case['regions']} region(s)</div>")
        parts.append("</div>")
    parts.append("<h2>The model</h2><table>")
    for name, value in (("file", summary["model"]), ("family", meta.model_family), ("architecture", config_items),
                        ("preprocessing", json.dumps(meta.preprocessing.to_dict())),
                        ("thresholds", f"image {meta.thresholds.image:.6g}, pixel {meta.thresholds.pixel:.6g}: {meta.thresholds.rule}"),
                        ("good-score statistics", f"mean {meta.score_stats.mean:.4g}, std {meta.score_stats.std:.4g} over "
                                                  f"{meta.score_stats.count} {threshold_scoring(training)} good images"),
                        *([("good map-maximum statistics", f"mean {meta.map_stats.mean:.4g}, std {meta.map_stats.std:.4g} (the score comes from the model's score head)")]
                          if meta.map_stats is not None else []),
                        ("model hash", meta.model_hash), ("made by", f"stmae-edge {meta.package_version}"),
                        ("training", ", ".join(f"{k} {v}" for k, v in training_summary(training).items()))):
        parts.append(f"<tr><th>{e(name)}</th><td>{e(str(value))}</td></tr>")
    parts.append("</table></body></html>\n")
    return "\n".join(parts)


def training_summary(training: dict) -> dict:
    """The lines of a model's training record a reader of the report wants first (stmae_edge.training
    writes the record; models from before a key was added simply lack it)."""
    summary = {k: training[k] for k in ("data_dir", "train_images", "holdout_images", "seconds") if k in training}
    if "epochs" in training.get("train_config", {}):
        summary["epochs"] = training["train_config"]["epochs"]
    head = training.get("defect_head")
    if isinstance(head, dict):  # train --defects, or add-defects (which records what it was added to)
        types = ", ".join(f"{k} {v}" for k, v in head.get("types", {}).items())
        added = f", added to the model {head['added_to'][:12]}..." if head.get("added_to") else ""
        summary["defect head"] = f"from {head.get('defective_images')} labelled defective images ({types}){added}"
    return summary
