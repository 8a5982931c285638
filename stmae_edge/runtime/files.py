"""Scoring image files into a folder: results as JSON and heatmap overlays as PNG (`stmae-edge predict`).

A file that cannot be read is reported and skipped; every other file is still scored and written.
A run into a folder that holds an earlier run's results replaces them whole: it writes its overlays
and results.json into a staging folder inside OUT, then, with Ctrl-C held, moves them into place and
removes the overlays that the earlier results.json lists and this run does not write; a run
interrupted or stopped by a full disk before then leaves the earlier run as it was, so the folder
never mixes two runs. Files it did not write are never touched: an overlay is removed only while its
bytes are those results.json recorded (a file of the same name that someone else wrote stays), an
overlay whose name is another file's there takes the next free name (<stem>_2.png), and nothing is
written through a symbolic link.

A backend that fails part-way (a server gone, a GPU lost) costs only what it had not scored: the images
scored before it are put in place as this run, whose results.json says under `stopped` why it stopped
and which files it did not score (None when it scored them all), and PredictionStoppedError says so.
The same call with resume=True (`predict ... --resume`) scores those files and adds them to that run.

Overlays are drawn, PNG-encoded and written by a pool of threads while the network scores the next
batch (the encoding alone took longer than the network at 4 MP):

    batch k:   decode -> Detector.predict -> results ──> pool: render, encode, write into staging
    batch k+1: decode -> Detector.predict ...        (batch k's overlays finish before k+2 is scored)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import cv2

from ..checks import is_whole
from ..data import IMAGE_SUFFIXES, images_in, may_be_one_file, not_read_in
from ..errors import (
    BackendError,
    ConfigError,
    DatasetError,
    InvalidImageError,
    NothingScoredError,
    OutputError,
    PredictionStoppedError,
    first_line,
)
from ..machine import available_cores
from ..outputs import (
    check_names_fit,
    check_output_folder,
    failure_reason,
    folder_held,
    move_into_place,
    partial_name,
    sha256_file,
    signals_held,
    staging_folder,
    sync_folder,
    write_bytes_atomically,
    write_staged,
)
from ..preprocessing import load_image
from ..progress import progress_bar
from ..scoring import threshold_scoring
from .detector import Detector
from .overlay import render_overlay
from .postprocess import resolve_thresholds

logger = logging.getLogger(__name__)
RESULTS_NAME = "results.json"


class ExpandedInputs(NamedTuple):
    paths: list[Path]  # files as given, folders as their image files
    left_out: list[dict]  # per folder, what it holds that is not scored: {"folder", "not_scored"} (not_read_in)


def expand_inputs(inputs: Sequence[Path | str], out: Path | str | None = None) -> ExpandedInputs:
    """Files as given, folders as their image files (sorted), in the order given, and what each folder
    holds that a user may take for images but is not scored (another format, its subfolders' images,
    but not `out`, where predict writes its overlays).

    Raises:
        DatasetError: a folder holds no image files (an empty run would read as "all passed"), or none
            of `inputs` exists (a mistyped folder: nothing to score, and nothing to replace an earlier
            run with).
    """
    if isinstance(inputs, (str, os.PathLike)):  # one path given where a list goes: not its characters
        inputs = [inputs]
    if not all(isinstance(item, (str, os.PathLike)) for item in inputs):
        raise DatasetError(f"inputs must be paths of image files or folders, not {inputs!r:.200}")
    missing = [str(item) for item in inputs if not os.path.lexists(item)]
    if inputs and len(missing) == len(inputs):
        raise DatasetError(f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: no such file or folder")
    paths: list[Path] = []
    left_out_of_folders: list[dict] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found, left_out = images_in(item), not_read_in(item, [out] if out is not None else [])
            if not found:
                raise DatasetError(f"{item}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this "
                                   f"folder" + (f"; not read: {left_out}" if left_out else ""))
            if left_out:
                left_out_of_folders.append({"folder": str(item), "not_scored": left_out})
            paths += found
        else:
            paths.append(item)  # one missing or unreadable file among others is reported when it is scored
    return ExpandedInputs(paths, left_out_of_folders)


# File systems take names of up to 255 bytes, and the atomic writer's temporary name adds 22 to the
# overlay's: a longer stem is cut and followed by a digest of the whole, so that names stay distinct.
MAX_STEM_BYTES = 200


def overlay_stem(path: Path) -> str:
    """The input's stem, or, past MAX_STEM_BYTES in UTF-8, its start and a digest of the whole stem."""
    stem = path.stem
    raw = stem.encode(errors="surrogateescape")  # a name in another encoding (a Windows share's Latin-1)
    if len(raw) <= MAX_STEM_BYTES:
        return stem
    start = stem[:MAX_STEM_BYTES - 13]
    while len(start.encode(errors="surrogateescape")) > MAX_STEM_BYTES - 13:  # whole characters only
        start = start[:-1]
    return f"{start}~{hashlib.sha256(raw).hexdigest()[:12]}"


def overlay_names(paths: Sequence[Path], taken: Callable[[str], bool] = lambda name: False,
                  advance: Callable[[], None] = lambda: None) -> list[str]:
    """<stem>.png per input, made unique (<stem>_2.png, ...) when inputs share a stem or the name is
    `taken` (a file in the output folder that this run may not replace); `advance` after each input."""
    used: set[str] = set()
    # per stem, the suffix its previous name took (1: the bare name); the names below it stay used or
    # taken, so the next starts above it: 20,000 inputs named image.png in as many folders each counted
    # up from 1 (quadratic, 110 s by a helper's projection)
    last_count: dict[str, int] = {}
    names = []
    for path in paths:
        stem = overlay_stem(path)
        count = last_count.get(stem, 0) + 1
        name = f"{stem}.png" if count == 1 else f"{stem}_{count}.png"
        # on a case-insensitive disk (macOS, Windows) Part1.png and part1.png are one file, and on
        # macOS's also "é" written as one character or as e and an accent
        while may_be_one_file(name) in used or taken(name):
            count += 1
            name = f"{stem}_{count}.png"
        last_count[stem] = count
        used.add(may_be_one_file(name))
        names.append(name)
        advance()
    return names


def replaceable(out: Path, earlier_overlays: dict[str, str]) -> Callable[[str], bool]:
    """Whether writing OUT/name would replace a file this command did not write: anything there but an
    overlay that the earlier results.json lists, with the bytes it recorded (a user's own image that
    shares an input's stem, in particular). Each name is looked at once: asked again (to say which
    overlays took another name), the answer is remembered, not the file hashed again."""
    @functools.cache
    def taken(name: str) -> bool:
        path = out / name
        if not os.path.lexists(path):
            return False
        recorded = earlier_overlays.get(name)
        try:
            return path.is_symlink() or not path.is_file() or recorded is None or sha256_file(path) != recorded
        except OSError:
            return True
    return taken


def predict_to_folder(detector: Detector, paths: Sequence[Path], out: Path, *, overlays: bool = True,
                      advance: Callable[[int], None] | None = None, image_threshold: float | None = None,
                      pixel_threshold: float | None = None, sigma: float | None = None,
                      left_out: Sequence[dict] = (), overlay_threads: int | None = None,
                      resume: bool = False) -> dict:
    """Score `paths` in batches; write OUT/results.json and OUT/<stem>.png. Returns the summary.

    Args:
        detector: the model, opened.
        paths: image files, or expand_inputs' result (it turns folders into them); unreadable ones are reported in the
            summary's `errors` and skipped.
        out: the output folder, not the folder of any input.
        overlays: write a heatmap overlay per image.
        advance: called with the number of files done after each batch (a progress bar).
        image_threshold, pixel_threshold, sigma: thresholds for this run instead of the model's
            (postprocess.resolve_thresholds).
        left_out: what the input folders hold that is not scored (expand_inputs), kept in results.json
            so that the record says what was not inspected.
        overlay_threads: threads that draw, encode and write overlays while the next batch is scored
            (None: one per core this process may use, at most 4; 0: in the calling thread, one after
            another, as scoring waits).
        resume: `out` holds a run that a failed backend stopped (PredictionStoppedError): score the files
            it did not, and add them to it. The same `paths`, thresholds and model (any backend) as that
            run; `advance` is first called with the number it had done.

    Raises:
        OutputError: `out` is an input's folder, or cannot be written. ConfigError: bad thresholds, or
            overlay_threads below 0. NothingScoredError: none of `paths` could be scored (its `errors` say
            why for each); `out` is left as it was. PredictionStoppedError: the detector failed (or was
            closed) after scoring some of `paths`: those are written, as this run, and the error's `summary`
            (results.json) lists the rest under `stopped`. BackendError: it failed before scoring any;
            `out` is left as it was. ConfigError, with resume: `out` holds no stopped run, or not one of
            these images, thresholds and model.
    """
    if overlay_threads is not None and (not is_whole(overlay_threads) or overlay_threads < 0):
        raise ConfigError(f"overlay_threads={overlay_threads!r}: give a whole number of threads, 0 or more "
                          "(None: one per core, at most 4)")
    if isinstance(paths, ExpandedInputs):  # expand_inputs' result as it comes
        paths, left_out = paths.paths, [*paths.left_out, *left_out]
    paths, out = [Path(path) for path in paths], Path(out)  # str as well as Path, as everywhere else
    if (out / RESULTS_NAME).is_dir():  # found only after the overlays were in place, which then had no record
        raise OutputError(f"{out / RESULTS_NAME} is a folder, where this run writes its results; move it away, or "
                          "choose another --out")
    chosen = resolve_thresholds(detector.thresholds, detector.score_stats, image_threshold, pixel_threshold, sigma,
                                detector.map_stats, threshold_scoring(detector.metadata.training))
    made = not out.exists()
    check_output_folder(out, paths)
    held = False
    try:
        with folder_held(out, "predict"):  # from reading the earlier run to putting this one in place
            held = True
            stopped_run = _stopped_run(out, paths, detector, chosen, overlays) if resume else None
            return _predict_into(detector, paths, out, overlays, advance, chosen, left_out, overlay_threads,
                                 stopped_run)
    except BaseException:
        if made and held:  # a folder made for this run, left empty by its failure (not one another run holds)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _predict_into(detector: Detector, paths: list[Path], out: Path, overlays: bool, advance, chosen,
                  left_out: Sequence[dict], overlay_threads: int | None, stopped_run: dict | None) -> dict:
    """predict_to_folder's work, once its arguments are checked and `out` is made; `stopped_run`: the
    results.json of the run to resume (_stopped_run), or None."""
    if stopped_run is None:
        earlier_overlays = overlays_listed_in(out / RESULTS_NAME)
        taken = foreign = replaceable(out, earlier_overlays)
    else:  # the stopped run's overlays stay, and so do their names, even where a file has gone since
        earlier_overlays = {}
        recorded = {may_be_one_file(entry["overlay"]) for entry in stopped_run["results"] if "overlay" in entry}
        taken = functools.cache(lambda name: may_be_one_file(name) in recorded or os.path.lexists(out / name))
        foreign = functools.cache(lambda name: may_be_one_file(name) not in recorded and os.path.lexists(out / name))
        done = len(paths) - len(stopped_run["stopped"]["not_scored"])  # the files not scored are the last ones
        paths = paths[done:]
        if advance:
            advance(done)
    names = []
    if overlays:
        # Where an earlier run's overlays lie, each name is hashed before it is taken: 20,000 overlays
        # at 4 MP took about a minute, silent before scoring began
        bar = progress_bar("checking the earlier run's overlays", len(paths)) if earlier_overlays else \
            contextlib.nullcontext(lambda n=1: None)
        with bar as checked:
            names = overlay_names(paths, taken, checked)
    moved = [(path, name) for path, name in zip(paths, names, strict=False)
             if name != f"{overlay_stem(path)}.png" and foreign(f"{overlay_stem(path)}.png")]
    if moved:  # the overlay is not where the user will look for it: results.json names it, and so does this
        logger.warning("%d overlays took another name, as %s holds files of theirs that this command did not write "
                       "(first: %s for %s)", len(moved), out, moved[0][1], moved[0][0])
    with staging_folder(out) as staging:
        check_names_fit(staging, [*names, partial_name(staging / RESULTS_NAME).name])
        threads = min(MAX_OVERLAY_THREADS, available_cores()) if overlay_threads is None else overlay_threads
        results, errors, stopped = _score_into(staging, detector, paths, names, chosen, advance,
                                               threads if names else 0)
        if paths and not results and stopped_run is None:  # an earlier run must not be replaced by failures
            raise NothingScoredError(f"none of the {len(paths)} images could be scored; {out} was left as it was",
                                     errors)
        summary = {"model": str(detector.model_path), "model_hash": detector.metadata.model_hash,
                   "runtime": detector.info, "thresholds": chosen.to_dict(), "overlays": overlays,
                   # how the files were read: both change verdicts (--bit-depth, --any-size)
                   "input": {"bit_depth": detector.preprocessing.bit_depth,
                             "sizes_checked": detector.sizes_accepted is not None},
                   "images": len(paths), "failed": sum(r["decision"] == "fail" for r in results),
                   "unreadable": len(errors), "results": results, "errors": errors, "left_out": list(left_out),
                   "overlays_not_written": 0, "stopped": stopped}
        staged = summary["results"]  # the entries whose overlays this run wrote
        if stopped_run is not None:
            summary = _resumed(stopped_run, summary)
        summary["replaced_overlays"] = _put_in_place(staging, out, summary, earlier_overlays, staged)
    if stopped:
        done = len(summary["results"]) + len(summary["errors"])
        raise PredictionStoppedError(
            f"the backend failed after {done} of {summary['images']} images ({stopped['error']}); what was scored "
            f"is in {out / RESULTS_NAME}, whose 'stopped' lists the {len(stopped['not_scored'])} images not "
            "scored: once the backend works, run the same command with --resume to score them", summary)
    return summary


def _resumed(stopped_run: dict, summary: dict) -> dict:
    """The stopped run's record with this run's results added: one run, scored in parts, each part's
    runtime listed under `resumed` (a GPU lost, the rest may be scored on the CPU)."""
    results = stopped_run["results"] + summary["results"]
    errors = stopped_run["errors"] + summary["errors"]
    resumed = [*stopped_run.get("resumed", []), {"runtime": summary["runtime"], "images": len(summary["results"])}]
    return {**stopped_run, "failed": sum(r["decision"] == "fail" for r in results), "unreadable": len(errors),
            "results": results, "errors": errors, "overlays_not_written": stopped_run["overlays_not_written"]
            + summary["overlays_not_written"], "stopped": summary["stopped"], "resumed": resumed}


def _stopped_run(out: Path, paths: Sequence[Path], detector: Detector, chosen, overlays: bool) -> dict:
    """The results.json in `out` of a run that a failed backend stopped, checked to be the run these
    arguments would make: the same images in the same order, thresholds, input settings, overlays and
    model, and of the shape predict writes (a file edited by hand is refused, not half merged).

    Raises:
        ConfigError: there is no such run in `out`, or it differs (naming how).
    """
    where = out / RESULTS_NAME

    def not_a_record(why: str) -> ConfigError:
        return ConfigError(f"--resume: {where} is not the results of a stopped run ({why}); leave --resume out to "
                           "score every image")

    try:
        document = read_results(where)
        stopped = document["stopped"]
    except FileNotFoundError:
        raise ConfigError(f"--resume: {out} holds no results.json, so no stopped run to resume; leave --resume out"
                          ) from None
    except (OSError, ValueError, RecursionError, LookupError, TypeError) as exc:
        raise not_a_record(first_line(exc, 120)) from None
    if stopped is None:
        raise ConfigError(f"--resume: {where} records a run that scored every image; there is nothing to resume: "
                          "leave --resume out to score them again")
    problem = _unlike_a_stopped_run(document)
    if problem:
        raise not_a_record(problem)
    recorded = [*(entry["source"] for entry in document["results"]),
                *(entry["source"] for entry in document["errors"]), *stopped["not_scored"]]
    given = [str(path) for path in paths]
    if sorted(given) != sorted(recorded):
        extra, missing = sorted(set(given) - set(recorded)), sorted(set(recorded) - set(given))
        raise ConfigError(f"--resume: give the images of the stopped run in {out} ({len(recorded)}), no others: "
                          + "; ".join([*([f"{len(extra)} not in it (first: {extra[0]})"] if extra else []),
                                       *([f"{len(missing)} of it not given (first: {missing[0]})"] if missing else []),
                                       *(["some given twice"] if not extra and not missing else [])]))
    if given[len(given) - len(stopped["not_scored"]):] != stopped["not_scored"]:
        raise ConfigError(f"--resume: give the images of the stopped run in {out} in the order it was given them "
                          "(the same command)")
    differences = [what for what, earlier, now in (
        ("model", document["model_hash"], detector.metadata.model_hash),
        ("thresholds", document["thresholds"], json.loads(json.dumps(chosen.to_dict()))),
        ("input settings (--bit-depth, --any-size)", document["input"],
         {"bit_depth": detector.preprocessing.bit_depth, "sizes_checked": detector.sizes_accepted is not None}),
        ("overlay setting (--no-overlays)", document["overlays"], overlays))
        if earlier != now]
    if differences:
        raise ConfigError(f"--resume: the stopped run in {out} was scored with another {' and '.join(differences)}; "
                          "resume it as it was started (the same model, thresholds and options)")
    return document


def _unlike_a_stopped_run(document) -> str:
    """What in a stopped run's results.json is not as predict wrote it ("" where all is), before any of it
    is merged: the entries the merge and the CLI's summary read, with their types."""
    def strings(entry: dict, *keys: str) -> bool:
        return all(isinstance(entry.get(key), str) for key in keys)

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    checks = (
        ("results", lambda v: isinstance(v, list) and all(
            isinstance(e, dict) and strings(e, "source") and e.get("decision") in ("pass", "fail")
            and isinstance(e.get("overlay", ""), str) and isinstance(e.get("overlay_error", ""), str) for e in v)),
        ("errors", lambda v: isinstance(v, list) and all(isinstance(e, dict) and strings(e, "source", "error")
                                                         for e in v)),
        ("stopped", lambda v: isinstance(v, dict) and strings(v, "error") and isinstance(v.get("not_scored"), list)
         and all(isinstance(source, str) for source in v["not_scored"])),
        ("runtime", lambda v: isinstance(v, dict) and strings(v, "backend", "device")),
        ("model", lambda v: isinstance(v, str)), ("model_hash", lambda v: isinstance(v, str)),
        ("thresholds", lambda v: isinstance(v, dict)), ("input", lambda v: isinstance(v, dict)),
        ("overlays", lambda v: isinstance(v, bool)), ("images", whole), ("failed", whole), ("unreadable", whole),
        ("overlays_not_written", whole), ("left_out", lambda v: isinstance(v, list)),
        ("resumed", lambda v: isinstance(v, list)))
    if not isinstance(document, dict):
        return f"a JSON {type(document).__name__}, not an object"
    for key, fits in checks:
        if key == "resumed" and key not in document:
            continue
        if key not in document or not fits(document[key]):
            return f"its {key!r} is {'missing' if key not in document else 'not as predict writes it'}"
    counted = len(document["results"]) + len(document["errors"]) + len(document["stopped"]["not_scored"])
    if document["images"] != counted:
        return f"its 'images' is {document['images']}, where it lists {counted}"
    return ""


MAX_OVERLAY_THREADS = 4  # PNG encoding is single-threaded per image; more threads hold more images


def _score_into(staging: Path, detector: Detector, paths: Sequence[Path], names: Sequence[str], chosen,
                advance: Callable[[int], None] | None,
                overlay_threads: int) -> tuple[list[dict], list[dict], dict | None]:
    """Each file's result, the files that could not be scored, and, where the backend failed after some
    were scored, why and which files it did not score ({"error", "not_scored"}; else None). Overlays
    (where `names`) go into `staging`, by `overlay_threads` threads while the next batch is scored (0:
    here, one after another)."""
    results, errors, stopped = [], [], None
    pool = ThreadPoolExecutor(overlay_threads, thread_name_prefix="stmae-edge-overlay") if overlay_threads else None
    # overlays still being written, oldest first: (result entry, its overlay's name, the sha256 to come)
    in_flight: deque[tuple[dict, str, Future]] = deque()
    try:
        for start in range(0, len(paths), detector.batch_size):
            chunk = list(range(start, min(start + detector.batch_size, len(paths))))
            unreadable_before = len(errors)
            try:
                kept, images, detections = _score_batch(detector, paths, chunk, chosen, errors)
            except BackendError as exc:
                if not results:  # nothing to keep: the earlier run in `out` stays
                    raise
                del errors[unreadable_before:]  # this batch's files are all listed as not scored
                stopped = {"error": first_line(exc), "not_scored": [str(path) for path in paths[start:]]}
                break
            for i, image, detection in zip(kept, images, detections, strict=True):
                detection = dataclasses.replace(detection, source=str(paths[i]))
                entry = detection.to_dict()
                results.append(entry)
                if not names:
                    continue
                if pool is None:
                    entry["overlay"], entry["overlay_sha256"] = names[i], _write_overlay(
                        staging, names[i], paths[i], image, detection, detector)
                else:
                    in_flight.append((entry, names[i], pool.submit(_write_overlay, staging, names[i], paths[i],
                                                                   image, detection, detector)))
            # Double buffering: the batch just scored is drawn while the next one is; the one before
            # must be written by then, so that at most two batches of images and maps are held.
            while len(in_flight) > len(kept):
                _collect(in_flight.popleft())
            if advance:
                advance(len(chunk))
        while in_flight:
            _collect(in_flight.popleft())
    finally:
        if pool is not None:  # before the staging folder is removed: no thread may write into it after
            pool.shutdown(wait=True, cancel_futures=True)
    return results, errors, stopped


def _score_batch(detector: Detector, paths: Sequence[Path], chunk: list[int], chosen,
                 errors: list[dict]) -> tuple[list[int], list, list]:
    """One batch read and scored: the indices scored, their images and Detections; files that could not be
    read or scored go to `errors`."""
    images, kept = [], []
    for i in chunk:
        try:
            # the model's size check too, here where the file is decoded: by its header, first
            images.append(load_image(paths[i], detector.preprocessing.max_pixels, detector.sizes_accepted))
            kept.append(i)
        except InvalidImageError as exc:
            errors.append({"source": str(paths[i]), "error": str(exc)})
    try:
        detections = detector.predict(images, image_threshold=chosen.image,
                                      pixel_threshold=chosen.pixel) if images else []
    except InvalidImageError:
        # One image the model cannot take (a uint16 frame above its bit depth) fails the whole batch:
        # score the batch one file at a time so that only that file is reported and skipped.
        detections = []
        for i in list(kept):
            try:
                detections.append(detector.predict(paths[i], image_threshold=chosen.image,
                                                   pixel_threshold=chosen.pixel))
            except InvalidImageError as exc:
                errors.append({"source": str(paths[i]), "error": str(exc)})
                images.pop(kept.index(i))
                kept.remove(i)
    return kept, images, detections


def _write_overlay(staging: Path, name: str, source: Path, image, detection, detector: Detector) -> str:
    """One overlay drawn, encoded and written into `staging` (in a pool thread: OpenCV and hashlib
    release the GIL while they work). Returns its sha256.

    Raises:
        OutputError: it cannot be encoded or written.
    """
    ok, png = cv2.imencode(".png", render_overlay(image, detection, detector.map_stats,
                                                 bit_depth=detector.preprocessing.bit_depth))
    if not ok:
        raise OutputError(f"cannot encode the overlay of {source}")
    encoded = png.tobytes()
    try:  # the staging folder is this run's alone: no temporary name needed within it
        write_staged(staging / name, encoded)
    except OSError as exc:
        raise OutputError(f"cannot write {staging.parent / name}: {failure_reason(exc, staging)}; "
                          "nothing was replaced") from exc
    return hashlib.sha256(encoded).hexdigest()


def _collect(written: tuple[dict, str, Future]) -> None:
    """A pool thread's overlay put in its result entry; its error raised here, in the scoring thread."""
    entry, name, sha256 = written
    entry["overlay"], entry["overlay_sha256"] = name, sha256.result()


def _put_in_place(staging: Path, out: Path, summary: dict, earlier_overlays: dict[str, str],
                  staged: list[dict]) -> int:
    """Move the overlays of the `staged` entries of summary's results and results.json into `out` and
    remove the earlier run's overlays that this one does not replace, with Ctrl-C held: only renames and
    removals, which need no space, so the folder holds one run or the other. Returns how many earlier
    overlays were removed.

    Raises:
        OutputError: results.json could not be staged (a full disk) or moved into place.
    """
    results = summary["results"]

    def encoded() -> bytes:
        return (json.dumps(summary, indent=2) + "\n").encode()

    write_bytes_atomically(staging / RESULTS_NAME, encoded(), follow_links=False)
    with signals_held():
        for entry in staged:
            if "overlay" not in entry:
                continue
            try:
                move_into_place(staging / entry["overlay"], out / entry["overlay"])
            except OSError as exc:
                message = f"cannot write {out / entry['overlay']}: {failure_reason(exc, out)}"
                if not isinstance(exc, PermissionError):
                    raise OutputError(message) from exc
                # one overlay refused (a file held open on Windows, past the retries) costs only itself;
                # its result says so (the CLI prints it as an error line)
                logger.info("%s", message)
                del entry["overlay"], entry["overlay_sha256"]
                entry["overlay_error"] = message
                summary["overlays_not_written"] += 1
        if summary["overlays_not_written"]:
            write_bytes_atomically(staging / RESULTS_NAME, encoded(), follow_links=False)
        try:
            move_into_place(staging / RESULTS_NAME, out / RESULTS_NAME)
        except OSError as exc:
            raise OutputError(f"cannot write {out / RESULTS_NAME}: {failure_reason(exc, out)}") from exc
        sync_folder(out)
        # on a case-insensitive disk (macOS, Windows) Part1.png is the part1.png just written
        written = {may_be_one_file(entry["overlay"]) for entry in results if "overlay" in entry}
        stale = sorted(name for name in earlier_overlays if may_be_one_file(name) not in written)
        removed = 0
        for name in stale:
            path = out / name
            try:
                if path.is_symlink() or not path.is_file() or sha256_file(path) != earlier_overlays[name]:
                    continue  # not the overlay that run wrote
                path.unlink()
                removed += 1
            except OSError as exc:  # open in a viewer on Windows: the results are written, the file stays
                logger.warning("%s: an overlay of the earlier run could not be removed (%s)", out / name,
                               exc.strerror or exc)
    return removed


# An earlier run's results.json, read to find its overlays: some 300 bytes an image, so 1 GiB is
# millions of images; a larger file is not one this package wrote.
MAX_RESULTS_BYTES = 1024 ** 3


def read_results(results_file: Path):
    """An earlier run's results.json as JSON, read within bounds: never through a symbolic link, at most
    MAX_RESULTS_BYTES. Its contents are the caller's to check.

    Raises:
        FileNotFoundError: there is none. OSError, ValueError (not JSON, a link, too large),
            RecursionError (nested thousands deep): not one to read.
    """
    if results_file.is_symlink():
        raise ValueError("a symbolic link")
    if results_file.stat().st_size > MAX_RESULTS_BYTES:
        raise ValueError(f"larger than {MAX_RESULTS_BYTES:,} bytes")
    return json.loads(results_file.read_text(encoding="utf-8"))


def overlays_listed_in(results_file: Path) -> dict[str, str]:
    """The overlay files an earlier run's results.json lists, by bare name, with the sha256 it recorded
    for each (anything else in it, or a file that is not such a document, is left alone: never a path
    outside the folder; overlays listed without a sha256, by versions before it was recorded, stay)."""
    try:
        document = read_results(results_file)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: a document nested thousands deep
        logger.warning("%s is not the results of an earlier run (%s): its overlays, if any, stay", results_file, exc)
        return {}
    entries = document.get("results") if isinstance(document, dict) else None
    entries = [entry for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []
    return {entry["overlay"]: entry["overlay_sha256"] for entry in entries
            if isinstance(entry.get("overlay"), str) and isinstance(entry.get("overlay_sha256"), str)
            and entry["overlay"] == Path(entry["overlay"]).name and entry["overlay"].endswith(".png")}

