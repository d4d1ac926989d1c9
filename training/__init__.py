"""Adapter methods and the one generic trainer; imports only ``core`` from this project.

``import training.methods`` registers every method in ``training.base.METHODS``.
"""
