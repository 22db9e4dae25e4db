"""diredi-sim: DiReDi (distillation and reverse distillation for AIoT) in plain PyTorch.

This package never imports flwr or ray; the Flower glue lives in clients/ and server/.
"""

__version__ = "0.1.0"
