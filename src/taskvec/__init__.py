"""taskvec: compose task vectors with learned anisotropic scaling (aTLAS) and its relatives."""

__version__ = "0.1.0"
