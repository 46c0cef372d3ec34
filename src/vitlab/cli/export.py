"""``vitlab export``: a checkpoint to a validated ONNX file (optionally int8), with a report; or its weights in timm's
layout (``--format timm``) or as a Hugging Face transformers folder (``--format hf``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from vitlab.cli.common import add_model_argument, add_threads_argument, fraction, model_args, positive_float
from vitlab.export.onnx import DEFAULT_MIN_AGREEMENT, DEFAULT_NUM_IMAGES, DEFAULT_TOLERANCE

log = logging.getLogger("vitlab")

EXAMPLE = """examples:
  vitlab export --checkpoint runs/digits-vit/model.safetensors --output digits.onnx
  vitlab export --checkpoint runs/mine/model.safetensors --output mine-int8.onnx --int8 --dynamic-batch
  vitlab export --checkpoint runs/mine/model.safetensors --output any.onnx --dynamic-size --data ./images
  vitlab export --checkpoint deit_small.safetensors --model deit_small_patch16_224 --output deit.onnx   (timm weights)
  vitlab export --checkpoint runs/detr/model.safetensors --output detr.onnx --dynamic-size   (then: vitlab detect
      IMG --checkpoint detr.onnx; likewise a SETR checkpoint and vitlab segment / eval)
  vitlab export --checkpoint runs/mine/model.safetensors --format timm --output mine-timm.safetensors
      (the weights under timm's names; it prints the timm.create_model(...) line that loads them)
  vitlab export --checkpoint runs/mine/model.safetensors --format timm --output mine-timm
      (a timm hub folder: timm.create_model("local-dir:mine-timm", pretrained=True) and transformers'
      AutoModelForImageClassification / AutoImageProcessor.from_pretrained("mine-timm") load it)
  vitlab export --checkpoint runs/mine/model.safetensors --format hf --output mine-hf
      (a ViT / DeiT / Swin v1-v2 / BEiT / MobileViT v1-v2 / ResNet as transformers' own ViTForImageClassification
      (...) folder, with its image processor)

The file is written only after the same real images (--data, else bundled digits) went through PyTorch
and ONNX Runtime with the checkpoint's own preprocessing and agreed (max |difference| of every output <=
--tolerance; for --int8, agreement >= --min-agreement). An output beyond the tolerance is re-run in float64
on the images where it differs most: if ONNX Runtime is no further from float64 than PyTorch's own float32
(ill-conditioned inputs, not a wrong graph), the file is written with a note. --force writes it anyway and says so.

Outputs: a classifier's "logits" (B, K); a DETR's "logits" (B, queries, classes + 1, the last "no object")
and "boxes" (B, queries, 4: normalised cx, cy, w, h), compared by the argmax class per query; a SETR's
"logits" (B, classes, H, W) at the input resolution, compared by the argmax class per pixel. Auxiliary
outputs are not exported. An exported DETR takes the image only: no padding mask, every pixel is real.
The task, the outputs' meaning and the class names are in the file's metadata.

--format timm writes a plain safetensors file that timm's model of the same architecture loads strictly (the same
outputs), with metadata: the timm model name and the create_model arguments where the model differs from that name's
defaults, the class names and the preprocessing. Families timm has no model for (T2T-ViT, CCT, MobileViT v3, DETR,
SETR, Linformer attention) and options timm has no argument for are refused, naming them. An --output without the
.safetensors suffix (or an existing folder) is a timm hub folder instead: model.safetensors and config.json (the
timm name and arguments, class names as label_names, the preprocessing as pretrained_cfg), as timm's save_for_hf
writes it; a non-empty folder is refused without --overwrite, which replaces those two files.

--format hf writes a folder as transformers' save_pretrained does: a ViT (or DeiT without a distillation token) as
ViTForImageClassification, a distilled DeiT as DeiTForImageClassificationWithTeacher, a Swin v1 / v2 as
SwinForImageClassification / Swinv2ForImageClassification, a BEiT (data2vec-vision's too) as
BeitForImageClassification, a MobileViT v1 / v2 as MobileViTForImageClassification /
MobileViTV2ForImageClassification, a ResNet as ResNetForImageClassification, with config.json (class names as
id2label) and preprocessor_config.json (the processor that resizes, crops, normalises and orders the channels as the
model's preprocessing: MobileViTImageProcessor for MobileViT, ConvNextImageProcessor for ResNet, as the hub's
folders); transformers loads it without timm or vitlab. What transformers' classes cannot compute is refused, naming
it (ViT's average pooling, registers, LayerScale; a Swin window per stage; BEiT-3's sub-LN; MobileViT v3, or depths
and widths transformers' MobileViT fixes otherwise; BiT's group-norm ResNet; other families); preprocessing and
other-size differences (the odd pixel of a crop margin) are printed as notes."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (validated, optionally int8)",
                       description="Export a vitlab checkpoint to ONNX with its preprocessing and class names in "
                                   "the file's metadata, validated against PyTorch before it is written.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="vitlab checkpoint, a Hugging Face folder, or timm / JAX weights with --model")
    p.add_argument("--model", help="registered architecture: of --checkpoint weights that do not name it (timm, JAX), "
                                   "or alone for random weights (for trying the export)")
    add_model_argument(p, with_model=False)
    add_threads_argument(p)
    p.add_argument("--format", choices=["onnx", "timm", "hf"], default="onnx",
                   help="onnx: a validated ONNX file; timm: the weights in timm's layout (*.safetensors, or a "
                        "timm hub folder that timm and transformers load) and the lines that load them; hf: a "
                        "Hugging Face transformers folder (ViT, DeiT, Swin v1/v2, BEiT, MobileViT v1/v2, ResNet as "
                        "transformers' own ...ForImageClassification, with their image processor), loaded without "
                        "timm")
    p.add_argument("--output", required=True, help="the file to write, e.g. model.onnx (model.safetensors for timm, "
                                                   "or a folder: a timm hub folder; a folder for hf)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch 1)")
    p.add_argument("--dynamic-size", action="store_true",
                   help="any input size, checked at two other sizes (refused for families that cannot)")
    p.add_argument("--img-size", type=int, help="export resolution (default: the checkpoint's)")
    p.add_argument("--int8", action="store_true",
                   help="ONNX Runtime dynamic int8 quantisation of the linear layers (convs, norms, softmax "
                        "stay float)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--data", help="data source whose test images validate the export (default: bundled digits)")
    p.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES, help="validation images")
    p.add_argument("--tolerance", type=positive_float, default=DEFAULT_TOLERANCE,
                   help="largest accepted |difference| of each output (logits, DETR's boxes) between ONNX Runtime "
                        "(float32) and PyTorch")
    p.add_argument("--min-agreement", type=fraction, default=None, metavar="FRACTION",
                   help=f"--int8 only: smallest accepted agreement of the int8 file with float32 PyTorch, a fraction "
                        f"from 0 to 1 (default {DEFAULT_MIN_AGREEMENT}; top-1, per query for DETR, per pixel for "
                        f"SETR)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    p.add_argument("--force", action="store_true", help="write the file even when a check fails (reported)")
    p.add_argument("--no-timing", action="store_true", help="skip the PyTorch vs ONNX Runtime speed comparison")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    if args.format == "timm":
        return run_timm(args)
    if args.format == "hf":
        return run_hf(args)
    from vitlab.export import ExportUnavailableError, ExportValidationError, export_onnx

    if args.num_images < 1:
        raise ValueError("--num-images must be >= 1")
    check_output(args, ".onnx", "predict, eval, detect and segment recognise ONNX files by that suffix")
    if args.min_agreement is not None and not args.int8:
        raise ValueError("--min-agreement applies to --int8 files (their agreement with float32 PyTorch); a float32 "
                         "export is checked by --tolerance")
    model = model_to_export(args)
    try:
        report = export_onnx(
            model, args.output, img_size=args.img_size, dynamic_batch=args.dynamic_batch,
            dynamic_size=args.dynamic_size, opset=args.opset, validate_images=args.data, num_images=args.num_images,
            tolerance=args.tolerance, int8=args.int8, force=args.force,
            min_agreement=DEFAULT_MIN_AGREEMENT if args.min_agreement is None else args.min_agreement,
            timing=not args.no_timing)
    except ExportValidationError as e:
        print(json.dumps(e.report.to_dict(), indent=2) if args.json else e.report.format())
        raise
    except ExportUnavailableError as e:
        log.error("error: %s", e)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0


def check_output(args: argparse.Namespace, suffix: str, why: str) -> Path:
    """``--output``: a file named ``*suffix`` that is not there yet (or ``--overwrite``)."""
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; give the file to write, e.g. {output / ('model' + suffix)}")
    if output.suffix.lower() != suffix:
        raise ValueError(f"--output {output}: name the file *{suffix} ({why}), e.g. {output.with_suffix(suffix)}")
    if output.exists() and not args.overwrite:
        raise ValueError(f"--output {output} exists; pass --overwrite to replace it")
    refuse_own_input(args, [output])
    return output


def refuse_own_input(args: argparse.Namespace, targets: list[Path]) -> None:
    """An export never writes over the checkpoint it reads (also not with --overwrite): the weights would be lost."""
    if not getattr(args, "checkpoint", None):
        return
    source = Path(args.checkpoint)
    for target in targets:
        same = (source.exists() and target.exists() and os.path.samefile(source, target)) or (
            source.resolve() == target.resolve())
        inside = source.is_dir() and target.resolve().parent == source.resolve()  # a folder checkpoint's files
        if same or inside:
            raise ValueError(f"--output {args.output} would replace {target}, which the checkpoint being exported "
                             f"({args.checkpoint}) is read from; write the export elsewhere")


def model_to_export(args: argparse.Namespace):
    """The model ``--checkpoint`` holds (``--model`` naming its architecture where the weights do not), or
    ``--model`` alone with random weights."""
    import vitlab

    if not (args.checkpoint or args.model):
        raise ValueError("give --checkpoint (and --model for timm or JAX weights), or --model alone for random weights")
    return (vitlab.load_model(args.checkpoint, model_name=args.model, **model_args(args)) if args.checkpoint
            else vitlab.create_model(args.model, **model_args(args)))


# options of the ONNX export, and their defaults: given with --format timm, they are refused (nothing to apply them to)
_ONNX_ONLY = (("dynamic_batch", "--dynamic-batch", False), ("dynamic_size", "--dynamic-size", False),
              ("img_size", "--img-size", None), ("int8", "--int8", False), ("opset", "--opset", None),
              ("data", "--data", None), ("num_images", "--num-images", DEFAULT_NUM_IMAGES),
              ("tolerance", "--tolerance", DEFAULT_TOLERANCE), ("min_agreement", "--min-agreement", None),
              ("force", "--force", False), ("no_timing", "--no-timing", False))


def _refuse_onnx_options(args: argparse.Namespace) -> None:
    given = [flag for attr, flag, default in _ONNX_ONLY if getattr(args, attr) != default]
    if given:
        raise ValueError(f"{', '.join(given)}: options of the ONNX export; --format {args.format} writes the weights "
                         f"as they are (the model's own input size)")


def run_timm(args: argparse.Namespace) -> int:
    """``--format timm``: the checkpoint's weights in timm's layout, and how timm loads them."""
    from vitlab.checkpoints import save_timm, timm_model_args

    _refuse_onnx_options(args)
    output = Path(args.output)
    if output.is_dir() or (output.suffix.lower() != ".safetensors" and output.suffix.lower() not in _FILE_SUFFIXES):
        return run_timm_folder(args, output)
    output = check_output(args, ".safetensors", "--format timm writes a safetensors file, or a timm hub folder "
                                                "given a name without a file suffix")
    model = model_to_export(args)
    timm_model_args(model)  # refuses a family or option timm has not, before anything is written
    found = save_timm(model, output)
    pre = model.preprocessing
    report = {"output": str(output), "format": "timm", "timm_model": found.model_name, "timm_kwargs": found.kwargs,
              "builder": found.builder, "load": found.load_line(output), "notes": list(found.notes),
              "input_size": list(pre.input_size), "mean": list(pre.mean), "std": list(pre.std)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    built = "timm's " + (found.model_name if found.builder == "timm.create_model" else found.builder.rsplit(".", 1)[1])
    print(f"wrote {output}: {model.model_name}'s weights in {built} layout")
    print("load it in timm:")
    print("    import safetensors.torch, timm")
    print(f"    model = {found.build_call()}")
    print(f"    model.load_state_dict(safetensors.torch.load_file({str(output)!r}))")
    print(f"its inputs: {pre.input_size[1]}x{pre.input_size[2]} px, mean {tuple(pre.mean)}, std {tuple(pre.std)} (also in "
          f"the file's metadata)")
    for note in found.notes:
        print(f"note: {note}")
    return 0


# --output suffixes of files, not folders: refused with --format timm (a name without one is a timm hub folder)
_FILE_SUFFIXES = (".onnx", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".npz", ".json", ".h5", ".tar", ".zip")


def run_timm_folder(args: argparse.Namespace, output: Path) -> int:
    """``--format timm --output DIR``: a timm hub folder (model.safetensors + config.json), and how timm and
    transformers load it."""
    from vitlab.checkpoints import save_timm_folder, timm_hub_config

    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; a timm hub folder export writes a folder (name a folder, or "
                         f"a *.safetensors file for the weights alone)")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise ValueError(f"--output {output} is a folder that is not empty; pass --overwrite to replace its "
                         f"model.safetensors and config.json")
    refuse_own_input(args, [output / "model.safetensors", output / "config.json"])
    model = model_to_export(args)
    config = timm_hub_config(model)  # refuses what timm cannot build by name, before anything is written
    found = save_timm_folder(model, output, overwrite=args.overwrite)
    timm_line = f"timm.create_model({'local-dir:' + str(output)!r}, pretrained=True)"
    hf_lines = [f"AutoModelForImageClassification.from_pretrained({str(output)!r})",
                f"AutoImageProcessor.from_pretrained({str(output)!r})"]
    pcfg = config["pretrained_cfg"]
    if args.json:
        print(json.dumps({"output": str(output), "format": "timm", "layout": "timm hub folder",
                          "timm_model": found.model_name, "timm_kwargs": found.kwargs, "load_timm": timm_line,
                          "load_transformers": hf_lines, "notes": list(found.notes),
                          "input_size": pcfg["input_size"], "mean": pcfg["mean"], "std": pcfg["std"]}, indent=2))
        return 0
    print(f"wrote {output}/ (model.safetensors, config.json): {model.model_name}'s weights in timm's "
          f"{found.model_name} layout")
    print("load it in timm:")
    print("    import timm")
    print(f"    model = {timm_line}")
    print("or in transformers:")
    print("    from transformers import AutoImageProcessor, AutoModelForImageClassification")
    print(f"    model = {hf_lines[0]}")
    print(f"    processor = {hf_lines[1]}")
    print(f"its inputs: {pcfg['input_size'][1]}x{pcfg['input_size'][2]} px, mean {tuple(pcfg['mean'])}, "
          f"std {tuple(pcfg['std'])} (config.json's pretrained_cfg)")
    for note in found.notes:
        print(f"note: {note}")
    return 0


def run_hf(args: argparse.Namespace) -> int:
    """``--format hf --output DIR``: a Hugging Face transformers folder (model.safetensors, config.json,
    preprocessor_config.json), and how transformers loads it."""
    from vitlab.checkpoints.to_hf import save_hf_folder

    _refuse_onnx_options(args)
    output = Path(args.output)
    if output.suffix.lower() in (".safetensors", *_FILE_SUFFIXES):
        raise ValueError(f"--output {output}: --format hf writes a folder (model.safetensors, config.json, "
                         f"preprocessor_config.json); name a folder, e.g. {output.with_suffix('')}")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; --format hf writes a folder")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise ValueError(f"--output {output} is a folder that is not empty; pass --overwrite to replace its "
                         f"model.safetensors, config.json and preprocessor_config.json")
    refuse_own_input(args, [output / "model.safetensors", output / "config.json"])
    model = model_to_export(args)
    found = save_hf_folder(model, output, overwrite=args.overwrite)  # refuses what transformers cannot build first
    lines = [f"AutoModelForImageClassification.from_pretrained({str(output)!r})",
             f"AutoImageProcessor.from_pretrained({str(output)!r})"]
    if args.json:
        print(json.dumps({"output": str(output), "format": "hf", "architecture": found.architecture,
                          "model_type": found.model_type, "load_transformers": lines, "notes": list(found.notes)},
                         indent=2))
        return 0
    print(f"wrote {output}/ (model.safetensors, config.json, preprocessor_config.json): {model.model_name} as "
          f"transformers' {found.architecture}")
    print("load it in transformers:")
    print("    from transformers import AutoImageProcessor, AutoModelForImageClassification")
    print(f"    model = {lines[0]}")
    print(f"    processor = {lines[1]}")
    for note in found.notes:
        print(f"note: {note}")
    return 0

