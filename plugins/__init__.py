"""Glue between ofa_timm and host frameworks, installed as ``ofa_timm.plugins``.

Modules here may import ``ofa_timm`` submodules but never the ``ofa_timm`` package root.
"""
