"""Export of T-REX (and baseline) checkpoints to ONNX, and checks of the exported graphs.

    trex-export --checkpoint models/trex.pt --out models/onnx      # export + manifest
    python -m export.evaluate_onnx --model-dir models/onnx         # held-out accuracy in ORT
    python -m export.bench_executor --checkpoint models/trex.pt    # one step vs K steps per call
    trex-export --checkpoint models/baseline.pt --out models/onnx-baseline   # the baseline
    python -m export.bench_baseline --model-dir models/onnx-baseline  # prefill and decode timings

This side imports torch and ``training``; the serving side (``service``) reads
only what lands in the output folder.
"""
