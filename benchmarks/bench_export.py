"""Batch-1 latency of an exported detector: onnxruntime (CPU) vs our JAX forward vs HF PyTorch, on CPU.

    python benchmarks/bench_export.py                  # Ti 1x512x688, S 1x800x1088, all cores
    python benchmarks/bench_export.py --threads=1      # all three pinned to one core
    python benchmarks/bench_export.py --variants=ti --repeats=5

Per case, the path a user takes: a HF YolosForObjectDetection (sdpa, random weights with O(1) activations,
`bench_forward.hf_model`) is mapped onto our parameter tree, saved as a converted directory and exported with
`export.export_checkpoint(format='onnx')` (symbolic batch, pixel mask, post-processing in the graph; the export
verifies itself). Then, on the same image (a full canvas; all-true mask), interleaved rounds of
  onnx  the artifact in onnxruntime's CPU provider (intra-op threads = --threads; graph optimisations on);
  jax   `Detector.forward` as `Detector.predict` runs it (jitted, our CPU attention kernel, pixel mask);
  hf    HF under torch.inference_mode() (torch threads = --threads).
Printed: medians, the ratios onnx/HF and jax/HF (< 1: faster than HF), per-round IQR of onnx/HF, the export's
wall time, and max |artifact - HF| on logits and boxes. Goal (issue 18): onnx/HF <= 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import cpu_setup  # noqa: E402  (benchmarks/; pins cores, XLA flags, allocator: before jax and torch)

THREADS = cpu_setup.prepare(sys.argv[1:], pin=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_forward import hf_model, hf_to_params, interleaved  # noqa: E402
from yolos_jax import export, weights  # noqa: E402
from yolos_jax.config import model_config  # noqa: E402
from yolos_jax.inference import Detector  # noqa: E402

IMAGE_HW = {"ti": (512, 688), "s": (800, 1088)}


def bench_case(variant: str, repeats: int, threads: int, workdir: str) -> dict:
    import onnxruntime as ort

    h, w = IMAGE_HW[variant]
    cfg = model_config(variant, layer_norm_eps=1e-12)  # HF-converted YOLOS configs carry eps 1e-12
    torch_model = hf_model(cfg)
    params = hf_to_params(torch_model.state_dict(), cfg)
    ckpt = os.path.join(workdir, f"{variant}_ckpt")
    weights.save_params_dir(ckpt, params, cfg.to_dict(), {"eval_size": 800})
    out = os.path.join(workdir, f"{variant}.onnx")
    t0 = time.perf_counter()
    description = export.export_checkpoint(ckpt, "onnx", (h, w), out)
    export_s = time.perf_counter() - t0

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(out, options, providers=["CPUExecutionProvider"])
    detector = Detector(params, cfg.to_dict())

    image = np.random.default_rng(0).standard_normal((1, h, w, 3)).astype(np.float32)
    mask = np.ones((1, h, w), bool)
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))  # HF takes NCHW

    def onnx_run():
        return session.run(["logits", "boxes"], {"pixel_values": image, "pixel_mask": mask})

    def jax_run():
        return detector.forward(image, mask)

    def hf_run():
        with torch.inference_mode():
            return torch_model(pixel_values=image_t)

    got, out_t = onnx_run(), hf_run()  # also the warm-up calls
    jax_run()
    err = {"logits": float(np.abs(got[0] - out_t.logits.numpy()).max()),
           "boxes": float(np.abs(got[1] - out_t.pred_boxes.numpy()).max())}
    times = {k: np.array(v) for k, v in interleaved({"onnx": onnx_run, "jax": jax_run, "hf": hf_run}, repeats).items()}
    med = {k: float(np.median(v)) for k, v in times.items()}
    return dict(variant=variant, image=f"1x{h}x{w}", ms={k: 1e3 * v for k, v in med.items()},
                onnx_hf=med["onnx"] / med["hf"], jax_hf=med["jax"] / med["hf"],
                iqr=np.percentile(times["onnx"] / times["hf"], [25, 75]), export_s=export_s, err=err,
                verified=description["verified"]["max_abs_diff"])


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="ti,s", help="comma-separated subset of: ti, s")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds, each one call of each")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="cores for all three (the process is pinned to the first N; default all)")
    args = parser.parse_args(argv)
    for v in args.variants.split(","):
        if v not in IMAGE_HW:
            parser.error(f"--variants: unknown variant {v!r}; choose from {sorted(IMAGE_HW)}")
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__}, onnxruntime {ort.__version__}, torch {torch.__version__}; cores "
          f"{sorted(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.1f}", flush=True)
    print("case             onnx ms   jax ms    HF ms  onnx/HF [per-round IQR]  jax/HF  export s  "
          "max|onnx - HF| logits, boxes", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for variant in args.variants.split(","):
            r = bench_case(variant, args.repeats, args.threads, workdir)
            rows.append(r)
            print(f"{r['variant']:>2} {r['image']:>11}  {r['ms']['onnx']:8.0f} {r['ms']['jax']:8.0f} "
                  f"{r['ms']['hf']:8.0f}  {r['onnx_hf']:6.3f} [{r['iqr'][0]:.3f}, {r['iqr'][1]:.3f}]  "
                  f"{r['jax_hf']:6.3f}  {r['export_s']:7.1f}  {r['err']['logits']:.1e}, {r['err']['boxes']:.1e}",
                  flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return rows


if __name__ == "__main__":
    main()
