"""Install fromage_fused. ``kernels/`` installs as ``fromage_fused.kernels``."""
from setuptools import setup

setup(
    name="fromage_fused",
    version="0.1.0",
    description="The Fromage optimizer for PyTorch as a couple of fused multi-tensor launches per step",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["fromage_fused", "fromage_fused.backends", "fromage_fused.kernels", "fromage_fused.bench"],
    package_dir={"fromage_fused.kernels": "kernels"},
    install_requires=["torch>=2.4"],
    entry_points={"console_scripts": ["fromage-bench=fromage_fused.bench.__main__:main"]},
)
