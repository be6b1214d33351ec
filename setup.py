from setuptools import find_packages, setup

setup(
    name="modeling-mae",
    version="0.1.0",
    description="Masked autoencoders (MAE) for vision, done the Hugging Face way",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["modeling_mae", "modeling_mae.*", "modeling_mae_cli", "modeling_mae_app"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.0",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "timm>=1.0",
        "pillow>=10",
        "pyyaml>=6",
        "numpy",
        "tqdm",
        "jinja2",  # model cards (huggingface_hub ModelCard.from_template)
        "matplotlib>=3.7",  # training_curves.png of pretraining
    ],
    extras_require={
        "demo": ["scikit-image>=0.22", "tensorboard"],  # the CPU demo's photographs; TensorBoard logs
        "tiff": ["tifffile"],  # multi-band TIFF (pixels.decode_array); 1- and 3-channel TIFF need only Pillow
        "app": ["gradio>=6.0"],  # the reconstruction page: python app.py --model DIR (modeling_mae_app)
        # the browser tests of the page (tests/test_app.py) drive Debian's chromium with playwright (.ci/run installs it)
        "dev": ["pytest>=8", "pytest-timeout", "parameterized", "scipy", "scikit-image>=0.22", "tensorboard", "tifffile",
                "gradio>=6.0", "playwright"],
    },
)
