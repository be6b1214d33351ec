"""The reconstruction page: a Gradio app for any pretrained MAE, locally or as a Hub Space.

    python app.py --model outputs/mae-demo        # our export, a transformers ViTMAE folder, an official .pth

`reconstruction.py` is the page's logic without its UI (load a model, prepare an image, five panels) and
imports no Gradio; `ui.py` is the Gradio page and the command line. The repository's `app.py` is a thin
launcher; the pretraining export copies it, with this code, into a Space
(`modeling_mae.training.export.write_space_files`).
"""
