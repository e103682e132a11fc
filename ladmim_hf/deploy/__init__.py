"""Deployment: `ladmim export` turns a trained detector into ONNX / OpenVINO graphs (`export.py`), and
`inference_ladmim.LadmimInferencer` scores with them without torch (it is copied beside every export).

Nothing is imported here, so importing the runtime does not import the exporter (torch, onnx).
"""
