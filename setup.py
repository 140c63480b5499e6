from setuptools import find_packages, setup

setup(
    name="diffedit",
    version="0.1.0",
    description="DiffEdit (Couairon et al., ICLR 2023) on hand-written Stable Diffusion networks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["diffedit", "diffedit.*"]),
    package_data={"diffedit.toy": ["*.safetensors"]},
    install_requires=["torch>=2.1", "einops", "open_clip_torch", "safetensors", "huggingface_hub", "numpy",
                      "pillow", "tqdm"],
    extras_require={
        "test": ["pytest", "diffusers==0.42.1", "transformers", "tokenizers", "scikit-image", "lpips==0.1.4", "torchmetrics", "gradio_client==2.7.2",
                 "playwright==1.65.2"],
        "app": ["gradio==6.31.0"],  # diffedit app
        "metrics": ["lpips==0.1.4"],  # LPIPS for diffedit sweep --lpips-weights (CLIP score uses open_clip)
        "plots": ["matplotlib"],
        "piebench": ["lpips==0.1.4"],  # the LPIPS SqueezeNet heads when --lpips-weights is torchvision's SqueezeNet file
        "sd3": ["tokenizers"],  # the T5 tokenizer of Stable Diffusion 3's optional third text encoder
    },
    entry_points={"console_scripts": ["diffedit=diffedit.cli:main"]},
)
