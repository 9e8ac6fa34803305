"""Triton kernels and their launchers (imported as ``fastdl.kernels``).

One module per op family; launchers take tensors and return tensors plus what the backward needs,
and never touch autograd. Importing this package needs Triton; fastdl imports it lazily, only when
a call resolves to the ``triton`` or ``interpret`` backend.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: Python runs with this repository's root on sys.path
    # (``python -m pytest``, ``python -c`` there). That name is Hugging Face's ``kernels`` package,
    # which transformers imports; this folder is only ever fastdl.kernels. Hand the import over to the
    # installed package, as Python would find it with the root off the path (a module may replace itself
    # in sys.modules while it runs; ``import`` returns the replacement).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(
            f"No module named 'kernels' ({os.path.dirname(__file__)} is fastdl.kernels)", name=__name__
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
