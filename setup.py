"""fairseq-dat: the Depth-Adaptive Transformer (Elbayad et al., ICLR 2020) as a fairseq plugin.

fairseq-fixed must be built with ``--no-build-isolation`` (its build would otherwise pull a CUDA
torch); ``make install`` does it in the right order. ``pip install -e . --no-deps`` then adds this
package to an environment that already has the requirements.
"""
from setuptools import find_packages, setup

setup(
    name="fairseq-dat",
    version="0.1.0",
    description="Depth-Adaptive Transformer (anytime decoder, depth estimators, exit-aware beam search) for fairseq",
    packages=find_packages(include=["fairseq_dat", "fairseq_dat.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch==2.13.0",
        "fairseq-fixed==0.12.3.1",
        "sacrebleu>=2.0",
        "subword-nmt",
        "sacremoses",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
)
