"""fairseq-dat: the Depth-Adaptive Transformer (Elbayad et al., ICLR 2020) as a fairseq plugin.

The packages and their pins are those of ``requirements.txt`` (read below: one list for both).
fairseq-fixed must be built with ``--no-build-isolation`` (its build would otherwise pull a CUDA
torch); ``make install`` does it in the right order. ``pip install -e . --no-deps`` then adds this
package to an environment that already has the requirements.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(kind: str):
    """The requirements.txt lines whose comment says ``kind`` ("test"), or, for "run", those without
    a build or test comment."""
    selected = []
    with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            requirement, _, comment = line.partition("#")
            requirement = requirement.strip()
            if not requirement:
                continue
            role = "test" if "test" in comment else "build" if "build" in comment else "run"
            if role == kind:
                selected.append(requirement)
    return selected


setup(
    name="fairseq-dat",
    version="0.1.0",
    description="Depth-Adaptive Transformer (anytime decoder, depth estimators, exit-aware beam search) for fairseq",
    packages=find_packages(include=["fairseq_dat", "fairseq_dat.*"]),
    python_requires=">=3.9",
    install_requires=requirements("run"),
    extras_require={"test": requirements("test")},
)
