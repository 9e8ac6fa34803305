"""Bridges from fastdl to other libraries. Each submodule imports its library lazily, so
``import fastdl`` never needs them.

* :mod:`fastdl.integrations.transformers` -- ``attn_implementation="fastdl"`` for Hugging Face
  ``transformers`` models.
"""
