"""The whole inspection of one model on a set of images: figures, numbers and the HTML report.

This is what ``vitlab analyze`` runs; it composes the pure functions of this package.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from vitlab.analysis.capture import capture, token_layout
from vitlab.analysis.distance import AttentionDistanceMeter, patch_centre_distances
from vitlab.analysis.explain_windows import capture_windowed, is_windowed
from vitlab.analysis.figures import attention_distance_figure, filters_figure, position_similarity_figure
from vitlab.analysis.filters import filter_components, patch_embedding_weight
from vitlab.analysis.pos_similarity import position_similarity, position_similarity_summary, position_table
from vitlab.analysis.report import Section, write_report
from vitlab.analysis.windows import WindowDistanceMeter, window_attention_distance
from vitlab.checkpoints.io import atomic_write
from vitlab.layers import CapturableAttention
from vitlab.layers.window_geometry import WindowGeometry

log = logging.getLogger(__name__)

DISTANCE_PNG = "attention_distance.png"
POSITION_PNG = "position_similarity.png"
FILTERS_PNG = "embedding_filters.png"
REPORT_HTML = "report.html"
NUMBERS_JSON = "analysis.json"
OUTPUT_FILES = (NUMBERS_JSON, REPORT_HTML, DISTANCE_PNG, POSITION_PNG, FILTERS_PNG)

POSITION_KINDS = {"learn": "learned", "sincos": "fixed 2-D sin-cos (not learned)",
                  "sincos-1d": "fixed 1-D sinusoid over the row-major grid (not learned)"}


def collate_present(batch: list) -> Any:
    """Default collation after dropping samples a dataset skipped (returned as None)."""
    from torch.utils.data import default_collate

    return default_collate([b for b in batch if b is not None])


def spread_images(dataset: Dataset, num_images: int) -> Dataset:
    """``num_images`` samples evenly spaced over the dataset (covers every class of a sorted set)."""
    n = len(dataset)
    if num_images >= n:
        return dataset
    idx = torch.linspace(0, n - 1, num_images).round().long().unique().tolist()
    return Subset(dataset, idx)


def attention_layer_labels(model: nn.Module) -> dict[nn.Module, tuple[int, int | None]]:
    """(block, branch) of each attention module inside ``model.blocks``: the block's 1-based depth and, inside a
    block that runs one sequence of blocks per branch (CrossViT's multi-scale blocks), the 1-based branch.
    Empty for a model without ``blocks``; attention outside them (T2T-ViT's tokens-to-token layers, CaiT's
    class attention) has no label."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return {}
    labels: dict[nn.Module, tuple[int, int | None]] = {}
    for i, blk in enumerate(blocks):
        labels.update({m: (i + 1, None) for m in blk.modules() if isinstance(m, CapturableAttention)})
        branches = getattr(blk, "blocks", None)
        if isinstance(branches, nn.ModuleList):
            for b, seq in enumerate(branches):
                labels.update({m: (i + 1, b + 1) for m in seq.modules() if isinstance(m, CapturableAttention)})
    return labels


def _distance_not_applicable(numbers: dict[str, Any], why_not: str, *, name: str, correct: int, seen: int,
                             not_scored: str | None, windowed: bool = False) -> Section:
    numbers["attention_distance"] = None
    numbers["attention_distance_not_applicable"] = why_not
    if windowed:
        return Section(title="Mean attention distance per stage (windowed attention)",
                       text=f"Not measured for {name} at this input size: {why_not}."
                            f"{_accuracy_sentence(correct, seen, not_scored)}")
    return Section(title="Mean attention distance (paper Fig. 7, right)",
                   text=f"Does not apply to {name}: {why_not}. Mean attention distance needs attention from patch "
                        f"tokens to patch tokens.{_accuracy_sentence(correct, seen, not_scored)}")


def token_attention_distance(model: nn.Module, loader: DataLoader, out: Path, *, device: str | torch.device,
                             not_scored: str | None = None,
                             name: str) -> tuple[dict[str, Any], Section, int, int]:
    """Mean attention distance per layer and head over the layers whose tokens attend among the patch tokens
    (ViT, DeiT, CaiT; CrossViT's, TNT's and T2T-ViT's layers over [prefix + patches]): the numbers, the report
    section (its figure written to ``out``), images seen, correct. Where no layer qualifies (MLP-Mixer, XCiT's
    channel attention, Linformer's projected keys) the section says why the measure does not apply. Layers are
    numbered by the model's block (``model.blocks``: T2T-ViT's backbone blocks, CrossViT's multi-scale blocks)."""
    meter = AttentionDistanceMeter()
    why_not = no_token_attention_reason(model)
    labels = attention_layer_labels(model)
    kept_labels: list[tuple[int, int | None]] = []
    correct = seen = 0
    layout = None
    for x, y in loader:
        x, y = x.to(device), torch.as_tensor(y).to(device)
        if why_not is None:
            cap = capture(model, x)
            logits, layout = cap.logits, cap.layout
            token = [(a, layer) for a, layer, t in zip(cap.attentions, cap.layers, cap.token_maps) if t]
            # labelled by the model's blocks (attention outside them left out), else numbered in call order
            token_maps = ([(a, labels[layer]) for a, layer in token if layer in labels] if labels
                          else [(a, (i + 1, None)) for i, (a, _) in enumerate(token)])
            try:
                meter.update([a for a, _ in token_maps], layout.grid, layout.patch_size,
                             max_prefix=layout.num_prefix_tokens)
            except ValueError:
                why_not = "none of its attention layers has patch tokens as queries and keys" + _other_maps(model)
            else:
                kept_labels = [token_maps[i][1] for i in meter.layers]  # class attention (CaiT) has no patch queries
        else:
            logits = model(x)
            layout = layout or token_layout_or_none(model, x)
        correct += int((logits.argmax(dim=-1) == y).sum())
        seen += x.shape[0]
    if seen == 0:
        raise ValueError("analyze: no images to analyse")
    numbers: dict[str, Any] = {"num_images": seen, "accuracy_on_images": None if not_scored else correct / seen}
    numbers["grid"] = list(layout.grid) if layout is not None else None
    numbers["patch_size"] = list(layout.patch_size) if layout is not None else None
    if why_not is not None:
        section = _distance_not_applicable(numbers, why_not, name=name, correct=correct, seen=seen,
                                           not_scored=not_scored)
        return numbers, section, seen, correct
    dist = meter.compute()  # (layers, heads)
    L, H = dist.shape
    numbers["attention_distance"] = {
        "pixels": dist.tolist(),
        "layer_mean": dist.mean(dim=1).tolist(),
        "layer_min": dist.amin(dim=1).tolist(),
        "layer_max": dist.amax(dim=1).tolist(),
        "layer_spread": (dist.amax(dim=1) - dist.amin(dim=1)).tolist(),
        # what a head attending uniformly over the grid would score: the yardstick for "local" vs "global"
        "uniform_reference": float(patch_centre_distances(layout.grid, layout.patch_size).mean()),
    }
    depth = [block for block, _ in kept_labels]
    numbers["attention_distance"]["layers"] = depth
    branches = [b for _, b in kept_labels]
    two_branches = len({b for b in branches if b is not None}) > 1  # CrossViT with both branches on this grid
    if two_branches:
        numbers["attention_distance"]["branch_of_layer"] = branches
    attention_distance_figure(dist, out / DISTANCE_PNG, layers=depth, title=f"mean attention distance: {name} ({seen} images)")
    table: list[list] = [["layer", *(["branch"] if two_branches else []), *[f"head {h + 1}" for h in range(H)],
                          "mean", "max - min"]]
    for i in range(L):
        table.append([depth[i], *([branches[i]] if two_branches else []), *[float(v) for v in dist[i]],
                      float(dist[i].mean()), float(dist[i].max() - dist[i].min())])
    section = Section(
        title="Mean attention distance (paper Fig. 7, right)", figure=DISTANCE_PNG,
        text=f"Attention-weighted distance in pixels between query and key patch centres, averaged over query "
             f"patches (prefix tokens excluded) and {seen} images; patch {layout.patch_size[0]}x"
             f"{layout.patch_size[1]} px on a {layout.grid[0]}x{layout.grid[1]} grid; a head attending "
             f"uniformly would score {numbers['attention_distance']['uniform_reference']:.2f} px."
             f"{_accuracy_sentence(correct, seen, not_scored)}",
        table=table)
    return numbers, section, seen, correct


def _uniform_window_distance(geom: WindowGeometry, stride: tuple[int, int]) -> float:
    """Mean distance of heads attending uniformly inside unshifted windows of ``geom``'s size: the most a
    window-bound head can reach on average, the windowed counterpart of the whole-image yardstick."""
    plain = WindowGeometry(size=geom.size, padded=geom.padded, window=geom.window, shift=(0, 0))
    N = plain.window_area
    uniform = torch.full((plain.num_windows, 1, N, N), 1.0 / N, dtype=torch.float64)
    return float(window_attention_distance(uniform, plain, stride)[0])


def windowed_attention_distance(model: nn.Module, loader: DataLoader, out: Path, *, device: str | torch.device,
                                not_scored: str | None = None,
                                name: str) -> tuple[dict[str, Any], Section, int, int]:
    """Mean attention distance per block, stage and head of a windowed-attention model (Swin), between
    the true positions of query and key tokens (cyclic shift undone, padding left out), in input pixels:
    the numbers, the report section (its figure written to ``out``), images seen, correct predictions."""
    from vitlab.analysis.explain import window_analysis_refused

    meter = WindowDistanceMeter()
    correct = seen = 0
    grid = patch = None
    why_not = None
    for x, y in loader:
        x, y = x.to(device), torch.as_tensor(y).to(device)
        if why_not is None:
            try:
                cap = capture_windowed(model, x)
            except ValueError as e:
                if not window_analysis_refused(model):
                    raise
                why_not = str(e)  # e.g. a Hugging Face-order Swin whose windows do not divide the maps
        if why_not is None:
            grid, patch = cap.grid, cap.patch_size
            meter.update(cap.attentions, cap.steps, cap.patch_size)
            logits = cap.logits
        else:
            logits = model(x)
        correct += int((logits.argmax(dim=-1) == y).sum())
        seen += x.shape[0]
    if seen == 0:
        raise ValueError("analyze: no images to analyse")
    if why_not is not None:
        layout = token_layout_or_none(model, x)
        numbers = {"num_images": seen, "accuracy_on_images": None if not_scored else correct / seen,
                   "grid": list(layout.grid) if layout is not None else None,
                   "patch_size": list(layout.patch_size) if layout is not None else None}
        section = _distance_not_applicable(numbers, why_not, name=name, correct=correct, seen=seen,
                                           not_scored=not_scored, windowed=True)
        return numbers, section, seen, correct
    per_block = meter.compute()  # one (heads,) per block; heads differ between stages
    per_stage = meter.compute_stages()
    blocks = [s for s in meter.steps if isinstance(s, WindowGeometry)]
    first_of_stage = {}
    for i, s in enumerate(meter.stages):
        first_of_stage.setdefault(s, i)
    stage_ids = sorted(first_of_stage)
    depth = list(range(1, len(per_block) + 1))
    numbers: dict[str, Any] = {"num_images": seen, "accuracy_on_images": None if not_scored else correct / seen,
                               "grid": list(grid), "patch_size": list(patch)}
    numbers["attention_distance"] = {
        "pixels": [d.tolist() for d in per_block],  # [block][head]
        "layers": depth,
        "stage_of_layer": [s + 1 for s in meter.stages],
        "layer_mean": [float(d.mean()) for d in per_block],
        "layer_min": [float(d.min()) for d in per_block],
        "layer_max": [float(d.max()) for d in per_block],
        "layer_spread": [float(d.max() - d.min()) for d in per_block],
        "stage_pixels": [d.tolist() for d in per_stage],  # [stage][head], mean over the stage's blocks
        "stage_mean": [float(d.mean()) for d in per_stage],
        "stage_grid": [list(blocks[first_of_stage[s]].size) for s in stage_ids],
        "stage_window": [list(blocks[first_of_stage[s]].window) for s in stage_ids],
        "stage_token_stride": [list(meter.strides[first_of_stage[s]]) for s in stage_ids],
        # heads attending uniformly inside their windows: the reach windows allow at each stage
        "stage_window_uniform_reference": [_uniform_window_distance(blocks[first_of_stage[s]],
                                                                    meter.strides[first_of_stage[s]])
                                           for s in stage_ids],
        # a head attending uniformly over the whole first-stage grid: the yardstick ViT reports use
        "uniform_reference": float(patch_centre_distances(grid, patch).mean()),
    }
    heads = max(d.numel() for d in per_block)
    padded = torch.full((len(per_block), heads), float("nan"))  # heads differ per stage: NaN is not drawn
    for i, d in enumerate(per_block):
        padded[i, : d.numel()] = d
    attention_distance_figure(padded, out / DISTANCE_PNG, layers=depth,
                              title=f"mean attention distance: {name} ({seen} images)")
    ad = numbers["attention_distance"]
    table: list[list] = [["layer", "stage", "heads", "mean", "min", "max", "max - min"]]
    for i, d in enumerate(per_block):
        table.append([depth[i], meter.stages[i] + 1, d.numel(), ad["layer_mean"][i], ad["layer_min"][i],
                      ad["layer_max"][i], ad["layer_spread"][i]])
    stages_text = "; ".join(
        f"stage {s + 1}: {ad['stage_grid'][k][0]}x{ad['stage_grid'][k][1]} tokens of "
        f"{ad['stage_token_stride'][k][0]}x{ad['stage_token_stride'][k][1]} px, window "
        f"{ad['stage_window'][k][0]}x{ad['stage_window'][k][1]}, mean {ad['stage_mean'][k]:.2f} px "
        f"(uniform in the window: {ad['stage_window_uniform_reference'][k]:.2f} px)"
        for k, s in enumerate(stage_ids))
    section = Section(
        title="Mean attention distance per stage (windowed attention)", figure=DISTANCE_PNG,
        text=f"Attention-weighted distance in pixels between the true positions of query and key tokens "
             f"(cyclic shift undone, padding excluded), averaged over queries and {seen} images; one point "
             f"per head. {stages_text}. A head attending uniformly over the whole image would score "
             f"{ad['uniform_reference']:.2f} px.{_accuracy_sentence(correct, seen, not_scored)}",
        table=table)
    return numbers, section, seen, correct


def _accuracy_sentence(correct: int, seen: int, not_scored: str | None) -> str:
    """The sanity check's sentence: top-1 on the images, or why there is none (``not_scored``)."""
    if not_scored:
        return f" No accuracy: {not_scored}."
    return f" Accuracy on these {seen} images: {correct / seen:.1%}."


def why_not_scored(model: nn.Module, dataset: Dataset) -> str | None:
    """Why top-1 on ``dataset`` means nothing for ``model`` (None: it does): no classifier, or other classes."""
    classes = getattr(getattr(dataset, "dataset", dataset), "classes", None)
    k = getattr(model, "num_classes", 0)
    if not k:
        return "the model has no classifier (its outputs are features)"
    if classes is not None and len(classes) != k:
        return f"the model has {k} classes, the data {len(classes)}"
    names = getattr(model, "class_names", None)
    if classes is not None and names and list(map(str, names)) != list(map(str, classes)):
        return "the model's class names are not the data's"
    return None


@torch.no_grad()
def analyze_model(
    model: nn.Module,
    dataset: Dataset,
    output_dir: str | Path,
    *,
    num_images: int = 256,
    batch_size: int = 64,
    num_components: int = 28,
    device: str | torch.device = "cpu",
    model_desc: str = "",
    data_desc: str = "",
    command: str = "",
) -> dict[str, Any]:
    """Write the figures, ``analysis.json`` and ``report.html`` to ``output_dir``; return the numbers."""
    was_training = model.training
    try:
        return _analyze(model, dataset, Path(output_dir), num_images=num_images, batch_size=batch_size,
                        num_components=num_components, device=device, model_desc=model_desc, data_desc=data_desc,
                        command=command)
    finally:
        model.train(was_training)  # the caller's model, as explain and extract_features leave it


def _analyze(model: nn.Module, dataset: Dataset, out: Path, *, num_images: int, batch_size: int,
             num_components: int, device: str | torch.device, model_desc: str, data_desc: str,
             command: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    name = getattr(model, "model_name", type(model).__name__)
    numbers: dict[str, Any] = {"model": model_desc or name, "data": data_desc, "command": command}
    sections: list[Section] = []

    # ---- mean attention distance over the images, plus accuracy on them as a sanity check
    images = spread_images(dataset, num_images)
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_present)
    distance = windowed_attention_distance if is_windowed(model) else token_attention_distance
    not_scored = why_not_scored(model, dataset)
    dist_numbers, section, seen, correct = distance(model, loader, out, device=device, name=name,
                                                    not_scored=not_scored)
    if not_scored:
        dist_numbers["accuracy_not_applicable"] = not_scored
    numbers.update(dist_numbers)
    sections.append(section)

    # ---- position-embedding similarity
    pt = position_table(model)
    if pt is None:
        numbers["position_similarity"] = None
        numbers["position_similarity_not_applicable"] = no_position_table_reason(model)
        sections.append(Section(title="Position embedding similarity (paper Fig. 7, centre)",
                                text=no_position_table_reason(model)))
    else:
        sim = position_similarity(pt.table)
        summary = position_similarity_summary(sim, pt.grid)
        numbers["position_similarity"] = {"kind": pt.kind, "grid": list(pt.grid), **summary}
        kind = POSITION_KINDS.get(pt.kind, pt.kind)
        position_similarity_figure(sim, pt.grid, out / POSITION_PNG, title=f"position embedding similarity ({kind})")
        sections.append(Section(
            title="Position embedding similarity (paper Fig. 7, centre)", figure=POSITION_PNG,
            text=f"Cosine similarity of each patch position's {kind} embedding with every other, class-token entry "
                 "excluded. Tile (r, c) shows position (r, c) against the whole grid.",
            table=[["statistic", "cosine similarity"], ["grid neighbours (distance 1)", summary["mean_neighbours"]],
                   ["all other positions", summary["mean_offdiag"]], ["far positions", summary["mean_far"]]]))

    # ---- embedding filters
    try:
        comps = filter_components(patch_embedding_weight(model), k=num_components)
    except ValueError as e:
        numbers["embedding_filters"] = None
        numbers["embedding_filters_not_applicable"] = str(e)
        sections.append(Section(title="Embedding filters (paper Fig. 7, left)", text=str(e)))
    else:
        k = comps.components.shape[0]
        evr = comps.explained_variance_ratio
        numbers["embedding_filters"] = {"num_components": k, "explained_variance_ratio": evr.tolist(),
                                        "shape": list(comps.components.shape[1:])}
        filters_figure(comps.components, out / FILTERS_PNG, title=f"embedding filters: first {k} principal components")
        sections.append(Section(
            title="Embedding filters (paper Fig. 7, left)", figure=FILTERS_PNG,
            text="Leading principal components of the patch-embedding filters (each flattened to C*P*P, centred), "
                 "each scaled to its own [0, 1] range.",
            table=[["component", "variance explained", "cumulative"]]
            + [[i + 1, float(evr[i]), float(evr[: i + 1].sum())] for i in range(k)]))

    atomic_write(out / NUMBERS_JSON, lambda tmp: Path(tmp).write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8"))
    (out / NUMBERS_JSON).chmod(0o644)
    write_report(out / REPORT_HTML, title=f"vitlab analysis: {name}",
                 meta=[("model", numbers["model"]), ("data", data_desc), ("images", str(seen)),
                       ("command", command), ("numbers", NUMBERS_JSON)],
                 sections=sections)
    log.info("wrote %s", out / REPORT_HTML)
    return numbers


def _other_maps(model: nn.Module) -> str:
    """Names the attention kinds whose maps are not token-to-token (XCiT's channel attention, Linformer)."""
    from vitlab.layers import CapturableAttention

    kinds = sorted({type(m).__name__ for m in model.modules()
                    if isinstance(m, CapturableAttention) and not getattr(m, "token_map", True)})
    return f" (its {', '.join(kinds)} maps are not token-to-token)" if kinds else ""


def no_token_attention_reason(model: nn.Module) -> str | None:
    """Why mean attention distance cannot apply to ``model`` at all (no attention layers), else None; whether
    any of its layers attends among the patch tokens is found from the captured maps."""
    from vitlab.analysis.capture import attention_blocks

    if not attention_blocks(model):
        return "it has no attention layers (e.g. MLP-Mixer mixes tokens with MLPs)"
    return None


def token_layout_or_none(model: nn.Module, x: torch.Tensor):

    try:
        return token_layout(model, (x.shape[-2], x.shape[-1]))
    except ValueError:
        return None


def no_position_table_reason(model: nn.Module) -> str:
    """What the report says when a model has no per-patch position table to compare."""
    kind = getattr(getattr(model, "cfg", None), "pos_embed", None)
    if kind == "none":
        return "This model has no position embeddings (pos_embed='none'); nothing to show."
    explained = getattr(model, "position_note", None)
    if explained:
        return f"Does not apply: {explained}"
    return (f"Does not apply: {type(model).__name__} has no position table of one embedding per patch "
            "(no position embeddings, or positions computed rather than stored); nothing to show.")
