"""What the GPU machine's own ``python3`` has: the one list of packages that training, evaluation, the
refresh and the GPU tools (``tools/gpu_check.py``, ``tools/benchmark.py``, ``tools/gpu_report.py``) may
import. ``tests/test_gpu_machine.py`` runs those tools in a Python that can import nothing else."""

from __future__ import annotations

# Import name -> the package that provides it (pip's name). matplotlib and rasterio are not on it:
# pictures are drawn only where matplotlib exists (utils/plots.py), and rasterio is tools/predict.py's.
GPU_MACHINE_PACKAGES: dict[str, str] = {
    "torch": "torch",
    "torchvision": "torchvision",
    "numpy": "numpy",
    "cv2": "opencv-python",
    "PIL": "Pillow",
    "sklearn": "scikit-learn",
    "tqdm": "tqdm",
    "tensorboard": "tensorboard",
    "yaml": "PyYAML",
}
