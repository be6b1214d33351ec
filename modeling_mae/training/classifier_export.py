"""The end of a fine-tuning or linear-probing run: the exported classifier (last and best), its model
card with the measured accuracy, `eval_results.json`, and the Hub push."""

from __future__ import annotations

import logging
from pathlib import Path


logger = logging.getLogger(__name__)

CLASSIFIER_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

`MAEForImageClassification` ({{ method }}) from the MAE encoder `{{ base_model }}`, trained with
`scripts/{{ script }}` of modeling_mae on **{{ dataset_name }}**.

## Results (measured by the training run)

| evaluated on | examples | top-1 | top-5 | loss |
|---|---|---|---|---|
| {{ eval_dataset }} ({{ eval_split }}) | {{ num_examples }} | {{ top1 }} | {{ top5 }} | {{ loss }} |

Best top-1 at epoch {{ best_epoch }} of {{ epochs }}; {{ kept }}.

## Use

```python
import modeling_mae  # or pass trust_remote_code=True
from transformers import pipeline

classifier = pipeline("image-classification", model="{{ repo_id }}", trust_remote_code=True)
classifier("cat.jpg")
```

## Training config

```yaml
{{ config_yaml }}```
"""


def write_classifier_card(output_dir, *, repo_id: str, base_model: str, dataset_name: str, eval_split: str,
                          results: dict, best_epoch: int, epochs: int, script: str, method: str,
                          config_yaml: str, kept: str, eval_dataset: str | None = None,
                          hub_dataset: str | None = None) -> Path:
    """README.md with the measured top-1 / top-5 (also as `model-index` eval results).

    `dataset_name`: what the text says it was trained on; `eval_dataset` / `eval_split`: what it was
    evaluated on (default: `dataset_name`); `hub_dataset`: the Hub id for the card's `datasets` metadata
    (None for local folders)."""
    eval_dataset = eval_dataset or dataset_name
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics = [("accuracy", "top-1 accuracy", results["top1"]), ("top_5_accuracy", "top-5 accuracy", results["top5"])]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["mae", "vision", "image-classification", "modeling_mae"],
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=base_model if base_model and not Path(base_model).exists() else None,
        model_name=repo_id,
        eval_results=[
            EvalResult(task_type="image-classification", dataset_type=hub_dataset or "imagefolder",
                       dataset_name=eval_dataset,
                       dataset_split=eval_split, metric_type=kind, metric_name=name, metric_value=round(value, 3))
            for kind, name, value in metrics
        ],
    )
    card = ModelCard.from_template(
        data, template_str=CLASSIFIER_CARD_TEMPLATE, model_name=repo_id, base_model=base_model,
        dataset_name=dataset_name, eval_dataset=eval_dataset, eval_split=eval_split,
        num_examples=results["num_examples"],
        top1=f"{results['top1']:.2f}%", top5=f"{results['top5']:.2f}%", loss=f"{results['loss']:.4f}",
        best_epoch=best_epoch, epochs=epochs, repo_id=repo_id, script=script, method=method,
        config_yaml=config_yaml, kept=kept,
    )
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path

def finish_classifier_run(accelerator, model, cfg, state: dict, script: str, method: str) -> int:
    """After training: the last model in `output_dir` (best one already in `output_dir/best`), both
    with `id2label` and a model card of their measured accuracy, `eval_results.json`, and the Hub push.
    Returns the exit code (1 when the push failed; the local output is complete either way)."""
    import json

    from .config import to_yaml
    from .export import HubPushError, export_model, push_to_hub

    full_state_dict = accelerator.get_state_dict(model)  # a collective: every process
    accelerator.wait_for_everyone()
    exit_code = 0
    if accelerator.is_main_process:
        last = state["history"][-1]
        best = next(h for h in state["history"] if h["epoch"] == state["best_epoch"])
        output = export_model(accelerator.unwrap_model(model), cfg.output_dir, state_dict=full_state_dict)
        summary = {"last": last, "best": best, "history": state["history"]}
        (output / "eval_results.json").write_text(json.dumps(summary, indent=2))
        if cfg.dataset_name:  # a Hub dataset: both splits from it
            data = dict(dataset_name=cfg.dataset_name, hub_dataset=cfg.dataset_name, eval_split=cfg.validation_split,
                        eval_dataset=cfg.validation_dir or cfg.dataset_name)
        else:  # local folders: trained on train_dir, evaluated on validation_dir
            data = dict(dataset_name=f"local image folders ({cfg.train_dir} for training, {cfg.validation_dir} for "
                        f"evaluation)", hub_dataset=None, eval_dataset=cfg.validation_dir, eval_split="validation_dir")
        card = dict(
            repo_id=cfg.hub_model_id or Path(cfg.output_dir).name, base_model=cfg.model_name_or_path, **data,
            best_epoch=state["best_epoch"], epochs=cfg.num_train_epochs, script=script, method=method,
            config_yaml=to_yaml(cfg),
        )
        write_classifier_card(output, results=last, kept="this directory holds the last epoch's model, the best "
                              "one is in `best/`", **card)
        if (output / "best").is_dir():
            write_classifier_card(output / "best", results=best, kept="this directory holds the best epoch's "
                                  "model", **card)
        logger.info("last epoch: top-1 %.2f%%, best: top-1 %.2f%% (epoch %d); exported to %s",
                    last["top1"], best["top1"], state["best_epoch"], output)
        if cfg.push_to_hub:
            try:
                url = push_to_hub(output, cfg.hub_model_id, cfg.hub_include_checkpoints, cfg.hub_private_repo,
                                  cfg.hub_token, commit_message=f"MAE {method}: top-1 {last['top1']:.2f}%")
                logger.info("pushed to %s", url)
            except HubPushError as err:
                logger.error("%s", err)
                exit_code = 1
    accelerator.wait_for_everyone()
    return exit_code
