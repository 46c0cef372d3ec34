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

from vitlab.analysis.capture import capture
from vitlab.analysis.distance import AttentionDistanceMeter, patch_centre_distances
from vitlab.analysis.figures import attention_distance_figure, filters_figure, position_similarity_figure
from vitlab.analysis.filters import filter_components, patch_embedding_weight
from vitlab.analysis.pos_similarity import position_similarity, position_similarity_summary, position_table
from vitlab.analysis.report import Section, write_report
from vitlab.checkpoints.io import atomic_write

log = logging.getLogger(__name__)

DISTANCE_PNG = "attention_distance.png"
POSITION_PNG = "position_similarity.png"
FILTERS_PNG = "embedding_filters.png"
REPORT_HTML = "report.html"
NUMBERS_JSON = "analysis.json"


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
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    name = getattr(model, "model_name", type(model).__name__)
    numbers: dict[str, Any] = {"model": model_desc or name, "data": data_desc, "command": command}
    sections: list[Section] = []

    # ---- mean attention distance over the images, plus accuracy on them as a sanity check
    images = spread_images(dataset, num_images)
    meter = AttentionDistanceMeter()
    why_not = no_token_attention_reason(model)
    correct = seen = 0
    layout = None
    for x, y in DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_present):
        x, y = x.to(device), torch.as_tensor(y).to(device)
        if why_not is None:
            cap = capture(model, x)
            layout = cap.layout
            token_maps = [a for a, t in zip(cap.attentions, cap.token_maps or [True] * len(cap.attentions)) if t]
            logits = cap.logits
            try:
                meter.update(token_maps, layout.grid, layout.patch_size)
            except ValueError:
                why_not = "none of its attention layers has patch tokens as queries and keys"
        else:
            logits = model(x)
            layout = layout or token_layout_or_none(model, x)
        correct += int((logits.argmax(dim=-1) == y).sum())
        seen += x.shape[0]
    if seen == 0:
        raise ValueError("analyze: no images to analyse")
    numbers["num_images"] = seen
    numbers["accuracy_on_images"] = correct / seen
    numbers["grid"] = list(layout.grid) if layout is not None else None
    numbers["patch_size"] = list(layout.patch_size) if layout is not None else None
    if why_not is not None:
        numbers["attention_distance"] = None
        numbers["attention_distance_not_applicable"] = why_not
        sections.append(Section(
            title="Mean attention distance (paper Fig. 7, right)",
            text=f"Does not apply to {name}: {why_not}. Mean attention distance needs attention from patch "
                 f"tokens to patch tokens. Accuracy on these {seen} images: {correct / seen:.1%}."))
    else:
        _distance_section(meter, layout, seen, correct, name, out, numbers, sections)

    # ---- position-embedding similarity
    pt = position_table(model)
    if pt is None:
        numbers["position_similarity"] = None
        sections.append(Section(title="Position embedding similarity (paper Fig. 7, centre)",
                                text=no_position_table_reason(model)))
    else:
        sim = position_similarity(pt.table)
        summary = position_similarity_summary(sim, pt.grid)
        numbers["position_similarity"] = {"kind": pt.kind, "grid": list(pt.grid), **summary}
        kind = "learned" if pt.kind == "learn" else "fixed 2-D sin-cos (not learned)"
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

    atomic_write(out / NUMBERS_JSON, lambda tmp: Path(tmp).write_text(json.dumps(numbers, indent=2) + "\n"))
    (out / NUMBERS_JSON).chmod(0o644)
    write_report(out / REPORT_HTML, title=f"vitlab analysis: {name}",
                 meta=[("model", numbers["model"]), ("data", data_desc), ("images", str(seen)),
                       ("command", command), ("numbers", NUMBERS_JSON)],
                 sections=sections)
    log.info("wrote %s", out / REPORT_HTML)
    return numbers


def no_token_attention_reason(model: nn.Module) -> str | None:
    """Why mean attention distance does not apply to ``model``, or None when it does."""
    from vitlab.analysis.capture import attention_blocks

    if not attention_blocks(model):
        return "it has no attention layers (e.g. MLP-Mixer mixes tokens with MLPs)"
    if not getattr(model, "token_attention", False):
        return (f"its attention is not token-to-token over the patch grid ({type(model).__name__}: e.g. XCiT's "
                f"channel attention, Linformer's attention to projected keys)")
    return None


def token_layout_or_none(model: nn.Module, x: torch.Tensor):
    from vitlab.analysis.capture import token_layout

    try:
        return token_layout(model, (x.shape[-2], x.shape[-1]))
    except ValueError:
        return None


def _distance_section(meter: AttentionDistanceMeter, layout, seen: int, correct: int, name: str, out: Path,
                      numbers: dict[str, Any], sections: list[Section]) -> None:
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
    depth = [i + 1 for i in meter.layers]  # class-attention layers (CaiT) have no patch queries
    numbers["attention_distance"]["layers"] = depth
    attention_distance_figure(dist, out / DISTANCE_PNG, layers=depth,
                              title=f"mean attention distance: {name} ({seen} images)")
    table: list[list] = [["layer", *[f"head {h + 1}" for h in range(H)], "mean", "max - min"]]
    for i in range(L):
        table.append([depth[i], *[float(v) for v in dist[i]], float(dist[i].mean()),
                      float(dist[i].max() - dist[i].min())])
    sections.append(Section(
        title="Mean attention distance (paper Fig. 7, right)", figure=DISTANCE_PNG,
        text=f"Attention-weighted distance in pixels between query and key patch centres, averaged over query "
             f"patches (prefix tokens excluded) and {seen} images; patch {layout.patch_size[0]}x"
             f"{layout.patch_size[1]} px on a {layout.grid[0]}x{layout.grid[1]} grid; a head attending "
             f"uniformly would score {numbers['attention_distance']['uniform_reference']:.2f} px. "
             f"Accuracy on these images: "
             f"{correct / seen:.1%}.",
        table=table))


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
