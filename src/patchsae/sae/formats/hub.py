"""Hugging Face hub: `hf:OWNER/REPO[/SUBFOLDER]` sources, and folders ready for `huggingface-cli upload`.

A source is fetched with `huggingface_hub.snapshot_download`, which answers from the local cache and honours
HF_HUB_OFFLINE; if the hub cannot be reached and nothing is cached, the error says how to fetch the folder
on another machine. A hub folder holds the SAE in SAELens layout at its root (so `SAE.load_from_disk` and
`read_sae` both open it), our sidecar, `run_config.json`, `metrics.json`, the analysis statistics under
`analysis/`, and a README.md model card whose YAML front matter the hub indexes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from patchsae import PatchSAEError

LIBRARY_NAME = "patchsae"
CARD_METRICS = ("explained_variance", "mse", "l0_per_token", "dead_fraction", "zero_shot_accuracy",
                "spliced_accuracy", "zero_ablated_accuracy")


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """("OWNER/REPO", "SUB/FOLDER" or None) of "hf:OWNER/REPO[/SUB/FOLDER]"."""
    parts = [p for p in spec[len("hf:"):].strip("/").split("/") if p]
    if len(parts) < 2:
        raise PatchSAEError(f"{spec!r}: a hub source is hf:OWNER/REPO or hf:OWNER/REPO/SUBFOLDER")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def resolve_hub(spec: str) -> Path:
    """Local folder of a hub source (from the cache when there, downloading otherwise)."""
    repo, sub = parse_hub_spec(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PatchSAEError("hf: sources need huggingface_hub (pip install huggingface_hub)") from None
    try:
        root = Path(snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None))
    except Exception as exc:  # noqa: BLE001 - offline, DNS, HTTP and auth errors all mean the same to the user
        local = repo.split("/")[1]
        raise PatchSAEError(
            f"cannot get {repo} from the Hugging Face hub ({_why(exc)}); on a machine with internet run "
            f"`hf download {repo} --local-dir {local}` (older huggingface_hub: `huggingface-cli download`), copy "
            f"that folder here and pass --sae {local}{'/' + sub if sub else ''}") from None
    folder = root / sub if sub else root
    if not folder.exists():
        raise PatchSAEError(f"{repo} has no folder {sub!r}")
    return folder


def _why(exc: Exception) -> str:
    """A short reason: offline mode with nothing cached, or the first sentence of the error."""
    from huggingface_hub import constants

    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and it is not in the local cache"
    if isinstance(exc, RepositoryNotFoundError):
        return "no such repository, or a private one: log in with `hf auth login`"
    if isinstance(exc, LocalEntryNotFoundError):
        return "huggingface.co cannot be reached and it is not in the local cache"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:100]}"


def write_hub(folder: Path, sae, *, model: str | None, layer: int | None, tokens: str | None,
              dataset: str | None, run_config: dict | None = None, metrics: dict | None = None,
              analysis_files: list[Path] | tuple = (), train_info: dict | None = None,
              repo_id: str | None = None) -> None:
    """Fill an existing (temporary) folder with everything a hub model repo of this SAE needs."""
    from patchsae.sae.formats import write_sae

    write_sae(sae, folder, "saelens", model=model, layer=layer, tokens=tokens, dataset=dataset,
              info={"run_config": run_config} if run_config else None)
    (folder / "run_config.json").write_text(json.dumps(run_config or {}, indent=2) + "\n")
    if metrics:
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for f in analysis_files:
        (folder / "analysis").mkdir(exist_ok=True)
        shutil.copy2(f, folder / "analysis" / Path(f).name)
    card = model_card(sae.cfg.to_json(), model=model, layer=layer, tokens=tokens, dataset=dataset,
                      metrics=metrics or {}, train_info=train_info or {},
                      analysis=[Path(f).name for f in analysis_files])
    (folder / "README.md").write_text(card.replace("OWNER/REPO", repo_id) if repo_id else card)


def _yaml_str(s: str) -> str:
    return json.dumps(str(s))  # a JSON string is a valid YAML scalar, quotes and all


def model_card(sae_cfg: dict, *, model, layer, tokens, dataset, metrics: dict, train_info: dict,
               analysis: list[str]) -> str:
    """README.md: YAML front matter (library_name, tags, base_model, datasets, model-index metrics) and a
    body that says how the SAE was trained, its numbers, and how to load it here and in SAELens."""
    lines = ["---", f"library_name: {LIBRARY_NAME}", "tags:"]
    lines += [f"  - {t}" for t in ("sparse-autoencoder", "patchsae", "saelens", "interpretability",
                                   "vision-transformer", f"sae-{sae_cfg['arch']}")]
    if model and "/" in str(model) and not Path(str(model)).exists():
        lines.append(f"base_model: {_yaml_str(model)}")
    if dataset:
        lines += ["datasets:", f"  - {_yaml_str(dataset)}"]
    shown = {k: metrics[k] for k in CARD_METRICS if isinstance(metrics.get(k), (int, float))}
    if shown:
        lines += ["model-index:", f"  - name: {_yaml_str(f'patchsae-{model}-block{layer}')}", "    results:",
                  "      - task:", "          type: feature-extraction", "          name: sparse autoencoder",
                  "        dataset:", f"          name: {_yaml_str(dataset or 'unknown')}",
                  f"          type: {_yaml_str(dataset or 'unknown')}", "        metrics:"]
        for k, v in shown.items():
            lines += [f"          - type: {k}", f"            value: {float(v):.6g}"]
    lines += ["---", ""]
    body = [
        f"# PatchSAE: {sae_cfg['arch']} SAE on block {layer} of {model}", "",
        f"A sparse autoencoder on the residual stream after block {layer} of `{model}` (token set `{tokens}`), "
        f"trained with patchsae on `{dataset}` following PatchSAE (Lim et al., ICLR 2025, arXiv 2412.05276).", "",
        "| setting | value |", "|---|---|",
        f"| architecture | {sae_cfg['arch']}" + (f" (k = {sae_cfg['k']})" if sae_cfg["arch"] in ("topk", "batchtopk")
                                                   else "") + " |",
        f"| width | {sae_cfg['d_model']} -> {sae_cfg['d_sae']} (x{sae_cfg['d_sae'] // max(sae_cfg['d_model'], 1)}) |",
    ]
    for k in ("tokens_trained", "lr", "batch_tokens", "warmup_steps"):
        if k in train_info:
            body.append(f"| {k.replace('_', ' ')} | {train_info[k]} |")
    if sae_cfg["arch"] == "relu":
        body.append(f"| L1 coefficient | {sae_cfg['l1_coeff']} |")
    body.append("")
    if shown:
        body += ["## Evaluation (held-out split, Table 2 style)", "", "| metric | value |", "|---|---|"]
        body += [f"| {k.replace('_', ' ')} | {float(v):.4f} |" for k, v in shown.items()]
        body.append("")
    body += [
        "## Load it", "", "In patchsae (makes a run every stage works on):", "", "```bash",
        "patchsae import --sae hf:OWNER/REPO --run runs/imported", "patchsae evaluate --run runs/imported", "```",
        "", "In SAELens (the weights at the root are a SAELens 6 folder; the input scale is folded in):", "",
        "```python", "from huggingface_hub import snapshot_download", "from sae_lens import SAE",
        "sae = SAE.load_from_disk(snapshot_download(\"OWNER/REPO\"))", "```", "",
        "`patchsae.json` records the input scale, the SAE config and the provenance; `run_config.json` the run "
        "that trained it" + (f"; `analysis/` holds {', '.join(analysis)} (per-latent statistics)." if analysis
                             else "."), "",
    ]
    return "\n".join(lines + body)
