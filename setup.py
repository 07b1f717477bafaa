"""imagen-jax: train and sample Imagen-style cascaded text-to-image diffusion models in JAX/Flax."""

import setuptools

# Core: everything needed to train, sample, encode and log to TensorBoard, without TensorFlow.
# Lower bounds are the versions tested together here; upper bounds admit JAX 0.11 (GPU images)
# but not an untested major change.
CORE = [
    "jax>=0.10.2,<0.12",
    "jaxlib>=0.10.2,<0.12",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.1.0,<2",
    "clu>=0.0.12,<0.1",
    "tensorflow-datasets>=4.9.10,<5",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "sentencepiece>=0.2.0,<0.3",
    "pillow>=11,<14",
    "numpy>=2.1,<3",
    "absl-py>=2.1,<3",
    "etils[epath]>=1.10,<2",
    "tensorstore>=0.1.86,<0.2",
    "safetensors>=0.7,<0.9",
    "msgpack>=1.0,<2",
    # TensorBoard's event-file writer and protos are pure Python: logging needs no TensorFlow.
    "tensorboard>=2.20,<2.22",
    "scipy>=1.14,<2",
    "tqdm>=4.66,<5",
    "gcsfs>=2025.1",
    # `imagen-jax serve`: the HTTP API, its server, its metrics and multipart uploads.
    "fastapi>=0.165,<1",
    "uvicorn>=0.55,<1",
    "prometheus-client>=0.26,<1",
    "python-multipart>=0.0.34,<0.1",
]

TEST = [
    "pytest>=8,<10",
    "pytest-xdist>=3.6,<4",
    # torch (its CPU build is enough): the tests compare our T5 with
    # Hugging Face's and our FID math with pytorch-fid's.
    "torch==2.13.0",
    "transformers>=5.0,<6",
    "gcp-storage-emulator>=2026.7",
    "google-cloud-storage>=3.0,<4",
    "nbclient>=0.10,<0.12",
    "nbformat>=5.10,<6",
    "ipykernel>=6.29,<8",
    # The serving tests: FastAPI's TestClient, and the web page in Debian's Chromium.
    "httpx>=0.28,<1",
    "playwright>=1.65,<2",
]

TF = [
    "tensorflow>=2.20,<2.22",
    "tensorflow-text>=2.20,<2.22",
    "seqio>=0.0.20",
]

LAUNCH = ["xmanager>=0.8.5,<0.9"]

# The tests compare the DeepFloyd IF U-Net and its weight reader/writer with diffusers' own.
DIFFUSERS = ["diffusers>=0.42.1,<0.43"]

setuptools.setup(
    name="imagen-jax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ lives at the top of the repository (readable next to the code) and is installed as
    # imagen_jax.configs, so `--config=configs/base64.py` works from any directory.
    packages=setuptools.find_packages(include=["imagen_jax", "imagen_jax.*"]) + ["imagen_jax.configs"],
    package_dir={"imagen_jax.configs": "configs"},
    package_data={"imagen_jax": ["text/assets/*", "serve/static/*"]},
    install_requires=CORE,
    extras_require={"test": TEST, "tf": TF, "launch": LAUNCH,
                    "diffusers": DIFFUSERS},
    entry_points={"console_scripts": ["imagen-jax=imagen_jax.cli:main"]},
)
