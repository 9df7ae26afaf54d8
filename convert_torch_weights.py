r"""Converts PyTorch / HF YOLOS and ViT checkpoints into yolos_jax's converted-checkpoint directory.

  # a DeiT backbone to start training from (config.init_from=DIR)
  python convert_torch_weights.py --source=deit_small_patch16_224-cd65a155.pth --output=/ckpt/deit_s
  python convert_torch_weights.py --source=deit_base_distilled_patch16_384-d0272ac0.pth --output=/ckpt/deit_b --variant=b
  # a MoCo v3 / DINO / MAE ViT (variant inferred from embed dim and depth)
  python convert_torch_weights.py --source=vit-s-300ep.pth.tar --output=/ckpt/mocov3_s --variant=s
  # trained detectors for inference (yolos_jax.Detector.from_checkpoint(DIR))
  python convert_torch_weights.py --source=yolos_s_300_pre.pth --output=/ckpt/yolos_s_orig
  python convert_torch_weights.py --source=/hf/yolos-small --output=/ckpt/yolos_s_hf

See yolos_jax/convert/__init__.py for the formats and what each one becomes (the output format: yolos_jax/weights.py).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys

from yolos_jax import convert


def _size(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected H,W (pixels), got {text!r}")
    return int(parts[0]), int(parts[1])


def _override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="checkpoint file or HF save_pretrained folder")
    parser.add_argument("--output", required=True, help="converted-checkpoint directory to create")
    parser.add_argument("--variant", default=None, help="model variant (ti, s, b, s_dWr, s_dwr); inferred if absent")
    parser.add_argument("--source_pe_size", type=_size, default=None, help="H,W pixels of the source's PE grid")
    parser.add_argument(
        "--model", type=_override, action="append", default=[], metavar="FIELD=VALUE",
        help="override a YOLOS config field, e.g. --model num_heads=4 (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    try:
        meta = convert.convert(
            args.source,
            args.output,
            variant=args.variant,
            model_overrides=dict(args.model),
            source_pe_size=args.source_pe_size,
            overwrite=args.overwrite,
        )
    except (convert.ConversionError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {k: meta[k] for k in ("kind", "source_format", "variant", "model", "notes") if k in meta}
    print(f"wrote {args.output}\n{json.dumps(summary, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
