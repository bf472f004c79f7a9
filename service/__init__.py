"""Serving side of T-REX: runs the exported ONNX graphs with ONNX Runtime.

Nothing under ``service`` imports torch or ``training``; everything the models need (the
vocabulary, the program layout, the sizes) is read from the export's manifest.json.
"""
