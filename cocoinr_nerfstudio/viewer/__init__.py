"""Live-viewer support for coco-inr: the method panel nerfstudio's viewer shows while training runs."""

from cocoinr_nerfstudio.viewer.panel import MethodPanel

__all__ = ["MethodPanel"]
