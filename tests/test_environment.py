"""The environment the Makefile builds: a matching torch/torchvision pair, and a core free of Flower and Ray."""
import ast
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_torchvision_nms_runs():
    # Fails with "operator torchvision::nms does not exist" when torchvision was built against
    # another torch than the one installed.
    from torchvision.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_flower_or_ray():
    files = sorted((ROOT / "diredi_sim").rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(ROOT)): sorted(_imported_modules(f) & {"flwr", "ray"}) for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}
    # and at run time: importing every core module pulls in neither
    modules = [".".join(p for p in f.relative_to(ROOT).with_suffix("").parts if p != "__init__") for f in files]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')]\nprint(bad)\nassert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
