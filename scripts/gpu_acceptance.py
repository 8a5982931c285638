"""GPU acceptance: every GPU path of the runtime against ONNX Runtime on the CPU, then `bench` JSON.

    bash scripts/gpu_acceptance.sh [--data ../shared/datasets/magnetic_tile] [--model MODEL.pt] [--out RESULTS.jsonl]

On a lent machine that lacks the train extra and the network (nothing to train or fetch weights with)
prepare the models and images here and carry the folder along (an ignored path, about 35 MB):

    bash scripts/gpu_acceptance.sh --prepare runs/gpu_prepared [--data ../shared/datasets/magnetic_tile]
    bash scripts/gpu_acceptance.sh --prepared runs/gpu_prepared --out $OUT/gpu_acceptance.jsonl   # there

Paths, each checked or skipped with the reason (what the machine lacks):
    torch-cuda                 the .pt checkpoint on the GPU (PyTorch with CUDA)
    ort-cuda, ort-tensorrt     the ONNX graphs through onnxruntime-gpu's CUDA and TensorRT providers
    tensorrt, tensorrt+graph   plans built here (TensorRT, or TensorRT for RTX) through cuda-python,
                               with and without CUDA-graph replay (TensorRT for RTX plans run on the
                               compute capabilities it targets only: not 9.0, an H100 or H200)
Checks: FP32 maps and scores within 1e-3 (relative to the largest value) of ONNX Runtime CPU on the
same images; FP16 and INT8 image AUROC within 0.2 and 1.0 points of FP32 on labelled data (the
synthetic set always, --data too if given and time allows). Then `stmae-edge bench` rows at batch 1,
8 and 32 for every path that ran, as JSON, and (with --model) the INT8 plan against the FP16 plan:
no larger, and at batch 8 no slower (within 5%). Budget: 8 minutes (--budget-s); what would not fit is
skipped, saying so, and a path that hangs past the budget ends the run with a trace of where it hung.
The AUROC checks show the FP32 AUROC they compare against: the tiny model separates the synthetic set
perfectly (1.0), where a check says little; --model gives a trained model's.

Needs only what the lent machines have (torch, onnx, onnxruntime, OpenCV, typer; cuda-python and
TensorRT where present) once prepared: the tiny model is trained with random backbone weights, so no
download. The inventory row records the GPU, its compute capability and driver (nvidia-smi), and
torch's CUDA and cuDNN versions. FP32 comparisons run with TF32 off: NVIDIA_TF32_OVERRIDE=0 for the whole
process (set before any GPU library loads; ONNX Runtime's TensorRT provider has no option of its own), and
PyTorch's flags (it would otherwise use TF32 for convolutions, and FP32 would be measured against TF32).
The plans are built after ONNX Runtime's paths have run, since importing TensorRT loads its libraries.
Each row is printed, and appended to --out, as it finishes, so a run cut short keeps what it measured.
Exit code: 0 when every path that ran passed (skips are not failures), 1 when one failed, 2 when a GPU
is here (nvidia-smi or torch sees one, or --expect-gpu) and no GPU path ran, 3 when --prepared is not a
prepared folder.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# FP32 on the GPU as FP32 for every library in the process, ONNX Runtime's TensorRT provider included,
# which has no option of its own for it: cuBLAS and cuDNN read this when they load, so it is set first
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
BUDGET_S = 8 * 60
SMI_FAILED = "nvidia-smi failed"
HANG_GRACE_S = 40  # past the budget, a hung path ends the run with its trace (the .sh's timeout comes later)
FP32_TOLERANCE, AUROC_POINTS = 1e-3, {"fp16": 0.2, "int8": 1.0}


def inventory() -> dict:
    """What this machine has, for the record and for the skip reasons."""
    found: dict = {"python": sys.version.split()[0]}
    try:  # before torch, whose CUDA libraries would let ONNX Runtime's CUDA provider start where, on a
        import onnxruntime as ort  # line PC without torch, it could not

        found["onnxruntime"] = f"{ort.__version__}: {', '.join(ort.get_available_providers())}"
    except ImportError:
        found["onnxruntime"] = None
    # TensorRT by its package records, not imported: importing it loads its libraries into the process,
    # which would hide whether ONNX Runtime's TensorRT provider finds them on its own
    import importlib.util

    from stmae_edge.runtime.backends import _tensorrt_version

    try:
        found["tensorrt"] = _tensorrt_version() or ("present" if importlib.util.find_spec("tensorrt") else None)
    except ImportError:
        found["tensorrt"] = None
    found["tf32_override"] = os.environ.get("NVIDIA_TF32_OVERRIDE")
    for name, modules in (("tensorrt_rtx", ("tensorrt_rtx_bindings", "tensorrt_rtx")), ("cuda_python", ("cuda.bindings",))):
        found[name] = None
        for module in modules:
            try:
                found[name] = getattr(__import__(module, fromlist=["x"]), "__version__", "present")
                break
            except ImportError:
                pass
    found["nvidia_smi"] = nvidia_smi()
    # the driver itself (libcuda), as the runtime asks it: a Jetson may have neither torch nor a working
    # `nvidia-smi --query-gpu`
    from stmae_edge.runtime.devices import cuda_device_count

    found["cuda_driver_gpus"] = cuda_device_count()
    try:
        import torch

        found["torch"] = torch.__version__
        found["torch_cuda"] = torch.version.cuda
        found["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        found["cuda_gpu"] = None
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            found["cuda_gpu"] = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    except ImportError:
        found["torch"] = found["cuda_gpu"] = None
    return found


def nvidia_smi() -> str | None:
    """The GPUs the driver sees, with compute capability and driver version (None: no nvidia-smi, or it
    failed): what says a GPU is here even where torch cannot use it."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{SMI_FAILED}: {exc}"
    if r.returncode != 0:  # "No devices were found", or no driver to talk to: no GPU to expect
        return f"{SMI_FAILED} (exit {r.returncode}): {(r.stdout + r.stderr).strip()[:200]}".replace("\n", "; ")
    return (r.stdout.strip() or f"{SMI_FAILED}: no GPU listed").replace("\n", "; ")


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from stmae_edge.evaluation.metrics import image_auroc

    return image_auroc(labels, scores)


def labelled(folder: Path, limit: int) -> tuple[list[Path], np.ndarray]:
    """A seeded sample of `limit` test images of `folder`, half good and half defective where it can
    be (both classes, for an AUROC), within the budget."""
    from stmae_edge.data import eval_samples

    samples = eval_samples(folder)
    rng = np.random.default_rng(0)
    if len(samples) > limit:
        by_class = [[i for i, s in enumerate(samples) if s.label == label] for label in (0, 1)]
        good = min(len(by_class[0]), limit // 2)
        chosen = [*rng.choice(by_class[0], good, replace=False),
                  *rng.choice(by_class[1], min(len(by_class[1]), limit - good), replace=False)]
        samples = [samples[i] for i in sorted(chosen)]
    return [s.path for s in samples], np.array([s.label for s in samples])


SYNTHETIC = {"n_good": 40, "n_bad": 40}  # enough that one swapped pair moves AUROC by 0.06 points, not 2.8


def prepare(work: Path, model: Path | None) -> dict[str, Path]:
    """The tiny model (or the one given) as .pt, fp32, fp16 and int8 ONNX."""
    from synthetic_data import make_synthetic_dataset

    from stmae_edge.engines.calibrate import calibrate
    from stmae_edge.engines.export import export_onnx
    from stmae_edge.errors import ConfigError
    from stmae_edge.models.stmae import preset
    from stmae_edge.training.train import TrainConfig, train

    data = make_synthetic_dataset(work / "data", **SYNTHETIC)
    if model is None:
        model = work / "tiny.pt"
        train(data, model, preset("tiny"), TrainConfig(epochs=2, batch_size=8), backbone_weights="random")
    files = {"pt": model, "fp32": export_onnx(model, work / "m.onnx")[0],
             "fp16": export_onnx(model, work / "m.fp16.onnx", "fp16")[0]}
    # A model with no layer as large as INT8 starts at by default (the tiny one) has its small ones
    # quantised anyway, so that the INT8 paths still run; the plan verdict then says why it skips.
    good = sorted((data / "train" / "good").iterdir())
    files["int8_all_layers"] = False
    try:
        files["int8"] = calibrate(files["fp32"], good, work / "m.int8.onnx", cache_dir=work / "calibration")[0]
    except ConfigError:
        files["int8_all_layers"] = True
        files["int8"] = calibrate(files["fp32"], good, work / "m.int8.onnx", cache_dir=work / "calibration",
                                  min_weight_elements=1)[0]
    files["data"] = data
    return files


MANIFEST = "manifest.json"


def write_prepared(files: dict, folder: Path, data: Path | None, data_images: int) -> None:
    """The models, the synthetic set and (with `data`) a seeded labelled sample of its test images,
    copied in its layout, in one folder that can travel to a machine without the train extra."""
    if not Path(files["pt"]).resolve().is_relative_to(folder.resolve()):  # --model: a copy travels with the rest
        files["pt"] = Path(shutil.copyfile(files["pt"], folder / "model.pt"))
    manifest = {k: (Path(v).relative_to(folder).as_posix() if isinstance(v, Path) else v) for k, v in files.items()}
    if data is not None:
        shutil.rmtree(folder / "data_sample", ignore_errors=True)  # a sample of an earlier --prepare would stay in it
        images, _ = labelled(data, data_images)
        for image in images:
            target = folder / "data_sample" / image.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target)
        manifest["data_sample"] = "data_sample"
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


class NotPrepared(Exception):
    """--prepared names a folder that --prepare did not make (not carried, or another path)."""


def read_prepared(folder: Path) -> dict:
    if not (folder / MANIFEST).is_file():
        raise NotPrepared(f"{folder}: no {MANIFEST}; make it with --prepare {folder} and carry the folder along")
    manifest = json.loads((folder / MANIFEST).read_text())
    return {k: (folder / v if isinstance(v, str) else v) for k, v in manifest.items()}


def paths(files: dict[str, Path], work: Path, have: dict) -> list[tuple[str, str, Path, dict]]:
    """(name, precision, model file, Detector arguments) of every GPU path, plans built here if possible."""
    out = [("torch-cuda", "fp32", files["pt"], {"backend": "torch-cuda"})]
    for precision in ("fp32", "fp16", "int8"):
        out.append((f"ort-cuda {precision}", precision, files[precision], {"backend": "ort-cuda"}))
        out.append((f"ort-tensorrt {precision}", precision, files[precision], {"backend": "ort-tensorrt"}))
    for precision in ("fp32", "fp16", "int8"):
        plan = work / f"m.{precision}.plan"
        out.append((f"tensorrt {precision}", precision, plan, {"backend": "tensorrt"}))
        out.append((f"tensorrt+graph {precision}", precision, plan, {"backend": "tensorrt", "cuda_graph": True}))
    return out


def build_plans(files: dict[str, Path], work: Path) -> dict[str, str]:
    """Plans for fp32, fp16 and int8; the reason per precision where none could be built."""
    from stmae_edge.engines.build import build_engine
    from stmae_edge.errors import StmaeError

    reasons = {}
    for precision in ("fp32", "fp16", "int8"):
        try:
            build_engine(files[precision], None, "1:8:32", work / f"m.{precision}.plan", timing_cache=work / "timing.cache")
        except StmaeError as exc:
            reasons[precision] = f"no plan: {exc}"
    return reasons


def int8_against_fp16(results: list[dict], work: Path, all_layers: bool) -> dict:
    """Issue 14: an INT8 plan is never larger or slower than the FP16 plan of the same model. Plan
    sizes, and inference time per batch of 8 (the median of `bench`'s rows, CUDA graphs off)."""
    row = {"path": "int8 against fp16 plan", "precision": "int8"}
    if all_layers:  # calibrated with every layer quantised (--min-weights 1): not what `calibrate` ships
        return row | {"status": "skipped",
                      "why": "the model has no layer INT8 pays for (the tiny one: give --model)"}
    ran = {r["precision"]: r for r in results if r["path"].startswith("tensorrt ") and r["status"] != "skipped"}
    if not {"fp16", "int8"} <= set(ran) or "bench" not in ran["fp16"] or "bench" not in ran["int8"]:
        return row | {"status": "skipped", "why": "no fp16 and int8 plans ran here"}
    size = (work / "m.int8.plan").stat().st_size / (work / "m.fp16.plan").stat().st_size
    batch8 = {p: next(b["infer_ms"] for b in ran[p]["bench"] if b["batch"] == 8) for p in ("fp16", "int8")}
    speed = batch8["fp16"] / batch8["int8"]
    checks = [{"plan_size_vs_fp16": round(size, 3), "passed": size <= 1.0},
              {"batch8_infer_ms": batch8, "speed_vs_fp16": round(speed, 2), "passed": speed >= 0.95}]  # 5% noise
    return row | {"status": "passed" if all(c["passed"] for c in checks) else "failed", "checks": checks}


def emit(row: dict, out: Path | None) -> dict:
    """One row, printed at once (and appended to `out`), so that a run cut short keeps what it measured."""
    line = json.dumps(row, default=str)
    print(line if "inventory" in row else f"{row['path']:24s} {row['status']:8s} {row.get('why') or row.get('checks')}",
          flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")
    return row


def fp32_tf32_off() -> None:
    """FP32 on the GPU as FP32: PyTorch lets cuDNN use TF32 for convolutions by default, which alone
    can exceed the 1e-3 the FP32 check allows."""
    try:
        import torch
    except ImportError:
        return
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """Largest absolute difference relative to the largest reference value, of one output: export's
    definition, which `verify` uses too."""
    from stmae_edge.engines.parity import relative_difference as definition

    return definition(got, want)


def run_path(Detector, benchmark, model: Path, kwargs: dict, precision: str, sets: dict, reference: dict,
             frames: list) -> dict:
    """One GPU path: opened (or skipped, saying why), checked on every set against ONNX Runtime CPU,
    then benchmarked (with CUDA graphs on a fresh Detector: the graph captured at the check's batch
    would be padded to and timed at that size)."""
    from stmae_edge.errors import StmaeError

    try:
        detector = Detector(model, **kwargs)
    except StmaeError as exc:
        return {"status": "skipped", "why": str(exc)}
    except Exception as exc:  # an unexpected failure to open is a finding, not the end of the run
        return {"status": "failed", "why": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}
    try:
        checks = []
        for set_name, (images, labels) in sets.items():
            maps, scores = detector.raw_maps(images)
            ref_maps, ref_scores, ref_auroc = reference[set_name]
            if precision == "fp32":
                diff = max(relative_difference(maps, ref_maps), relative_difference(scores, ref_scores))
                checks.append({"set": set_name, "max_rel_diff": diff, "passed": diff <= FP32_TOLERANCE})
            else:
                points = 100 * abs(auroc(labels, scores) - ref_auroc)
                checks.append({"set": set_name, "auroc_points_from_fp32": points, "fp32_auroc": ref_auroc,
                               "passed": points <= AUROC_POINTS[precision]})
        device = detector.info["device"]
        if kwargs.get("cuda_graph") and "not possible" in detector.info["provider"]:  # ran without graphs
            checks.append({"set": "CUDA graph capture", "passed": False, "provider": detector.info["provider"]})
        if kwargs.get("cuda_graph"):  # its graph was captured at the check's batch: bench from a fresh one
            detector.close()
            detector = Detector(model, **kwargs)
        bench = benchmark(detector, frames, [1, 8, 32], iterations=20, warmup=3)
        return {"status": "passed" if all(c["passed"] for c in checks) else "failed", "device": device,
                "checks": checks, "bench": bench}
    except Exception as exc:  # a GPU path that opened but failed is a finding, not a crash of the script
        return {"status": "failed", "why": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}
    finally:
        detector.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a labelled MVTec-layout set for the FP16/INT8 AUROC checks")
    parser.add_argument("--model", type=Path, help="a .pt checkpoint to use instead of the tiny model")
    parser.add_argument("--data-images", type=int, default=120, help="images of --data to score per path")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--prepare", type=Path, help="only prepare the models and images in this folder, to "
                        "carry to a machine without the train extra, then stop")
    parser.add_argument("--prepared", type=Path, help="a folder made by --prepare: use its models and images")
    parser.add_argument("--out", type=Path, help="append every row to this JSON-lines file as it finishes")
    parser.add_argument("--budget-s", type=int, default=BUDGET_S, help=f"seconds for the whole run, 60 to {BUDGET_S} (default)")
    parser.add_argument("--expect-gpu", action="store_true", help="exit 2 unless a GPU path ran (a GPU is "
                        "expected without this when nvidia-smi or torch sees one)")
    args = parser.parse_args()
    if not 60 <= args.budget_s <= BUDGET_S:  # gpu_acceptance.sh's timeout allows the default budget and its grace
        parser.error(f"--budget-s: from 60 to {BUDGET_S}")
    started = time.monotonic()
    faulthandler.dump_traceback_later(args.budget_s + HANG_GRACE_S, exit=True)
    have = inventory()
    emit({"inventory": have}, args.out)

    from stmae_edge.runtime import Detector
    from stmae_edge.runtime.bench import benchmark

    if args.prepare:
        args.prepare.mkdir(parents=True, exist_ok=True)
        write_prepared(prepare(args.prepare, args.model), args.prepare, args.data, args.data_images)
        shutil.rmtree(args.prepare / "calibration", ignore_errors=True)  # the cache is not needed there
        print(f"prepared {args.prepare} in {time.monotonic() - started:.0f} s: carry it and run with --prepared")
        return 0
    work = args.work
    if work is None:  # a folder of its own, removed when the script ends (each run left one behind in /tmp)
        work = Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
        atexit.register(shutil.rmtree, work, True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        files = read_prepared(args.prepared) if args.prepared else prepare(work, args.model)
    except NotPrepared as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    plan_reasons = None  # the plans are built when the first plan path comes, after ONNX Runtime's paths
    sets = {"synthetic": labelled(files["data"], 10_000)}
    data = files.get("data_sample") or args.data
    if data is not None and (Path(data) / "test").is_dir():
        sets["data"] = labelled(Path(data), args.data_images)
    elif data is not None:
        emit({"path": "the --data set", "status": "skipped", "why": f"{data}: no test folder on this machine"}, args.out)
    fp32_tf32_off()

    reference = {}  # ONNX Runtime CPU, fp32: maps, scores and AUROC per set
    cpu = Detector(files["fp32"], "ort-cpu")
    for name, (images, labels) in sets.items():
        maps, scores = cpu.raw_maps(images)
        reference[name] = (maps, scores, auroc(labels, scores))

    results, frames = [], [np.asarray(np.random.default_rng(k).integers(0, 256, (96, 96)), np.uint8) for k in range(32)]
    for name, precision, model, kwargs in paths(files, work, have):
        row = {"path": name, "precision": precision}
        if kwargs["backend"] == "tensorrt" and plan_reasons is None:
            # not before: importing TensorRT loads its libraries into the process, which would hide whether
            # ONNX Runtime's TensorRT provider finds them on its own (onnx_files.preload_tensorrt_libraries)
            plan_reasons = build_plans(files, work)
        if kwargs["backend"] == "tensorrt" and precision in plan_reasons:
            results.append(emit(row | {"status": "skipped", "why": plan_reasons[precision]}, args.out))
            continue
        if time.monotonic() - started > args.budget_s - 60:
            results.append(emit(row | {"status": "skipped", "why": f"the {args.budget_s} s budget is spent"},
                                args.out))
            continue
        results.append(emit(row | run_path(Detector, benchmark, model, kwargs, precision, sets, reference, frames),
                            args.out))
    results.append(emit(int8_against_fp16(results, work, all_layers=files["int8_all_layers"]), args.out))
    print(json.dumps({"results": results, "seconds": round(time.monotonic() - started, 1)}, default=str))
    ran = [r for r in results if r["status"] != "skipped"]
    print(f"{len(ran)} paths ran, {sum(r['status'] == 'failed' for r in ran)} failed, "
          f"{len(results) - len(ran)} skipped, in {time.monotonic() - started:.0f} s")
    if any(r["status"] == "failed" for r in ran):
        return 1
    smi = have.get("nvidia_smi") or ""
    gpu_here = (args.expect_gpu or have.get("cuda_gpu") or have.get("cuda_driver_gpus")
                or (smi and not smi.startswith(SMI_FAILED)))
    if gpu_here and not any(r["path"] != "int8 against fp16 plan" for r in ran):
        print("error: a GPU is expected here (the CUDA driver, nvidia-smi or torch sees one, or --expect-gpu) but no "
              "GPU path ran: see each row's reason", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
