"""Deploying without Python: ``export`` writes an AOTInductor package of a model with its
compositions folded (docs/deploy.md); ``scalearn-run`` (CMakeLists.txt) runs it from C++."""

from .export import METADATA_PREFIX, export, export_program

__all__ = ["METADATA_PREFIX", "export", "export_program"]
