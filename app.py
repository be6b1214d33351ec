#!/usr/bin/env python
"""The reconstruction page of a pretrained MAE (Gradio): locally, or as the `app.py` of a Hub Space.

    python app.py --model outputs/mae-demo         # our export, a ViTMAE folder / Hub id, an official .pth

In a Space written by the pretraining export (`write_space_files: true`) this file sits beside the model's
weights: with no `--model` it shows that model, and it imports the project's code from the `app_code/`
folder the export copied beside it (the project is not on PyPI). The page itself: `modeling_mae_app/ui.py`.
"""

import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent

if (HERE / "app_code").is_dir():  # an exported Space: the code that exported this model, ahead of any installed
    sys.path.insert(0, str(HERE / "app_code"))

from modeling_mae_app.ui import run  # noqa: E402


if __name__ == "__main__":
    sys.exit(run(default_model=str(HERE) if (HERE / "config.json").is_file() else None))
